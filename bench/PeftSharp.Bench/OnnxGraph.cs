using System.Text;

namespace PeftSharp.Bench;

/// <summary>
/// Writes small ONNX models (ModelProto protobuf) by hand, so ONNX Runtime can run the same op as a peer without
/// any Python tooling. Only the fields these benchmarks need: float tensors, nodes with int/float attributes.
/// Field numbers are from onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto, TensorProto).
/// </summary>
internal sealed class OnnxGraph
{
    private readonly List<byte[]> nodes = new();
    private readonly List<byte[]> inputs = new();
    private readonly List<byte[]> outputs = new();
    private readonly List<byte[]> initializers = new();
    private int nodeCount;

    public OnnxGraph Input(string name, params long[] shape)
    {
        inputs.Add(ValueInfo(name, shape));
        return this;
    }

    /// <summary>An int64 graph input (token ids).</summary>
    public OnnxGraph InputInt64(string name, params long[] shape)
    {
        inputs.Add(ValueInfo(name, shape, elemType: 7));
        return this;
    }

    /// <summary>A constant int64 tensor (shapes, slice bounds, gather indices).</summary>
    public OnnxGraph ConstantInt64(string name, long[] data, params long[] shape) => Initializer(name, data, 7, 8, shape);

    public OnnxGraph Output(string name, params long[] shape)
    {
        outputs.Add(ValueInfo(name, shape));
        return this;
    }

    /// <summary>A constant float tensor (ONNX initializer).</summary>
    public OnnxGraph Constant(string name, float[] data, params long[] shape) => Initializer(name, data, 1, 4, shape);

    /// <summary>A TensorProto initializer: dims (1), data_type (2: 1 FLOAT, 7 INT64), name (8), raw_data (9).</summary>
    private OnnxGraph Initializer(string name, Array data, int dataType, int elementSize, long[] shape)
    {
        var t = new Proto();
        foreach (long d in shape) t.Varint(1, (ulong)d);
        t.Varint(2, (ulong)dataType);
        t.String(8, name);
        var raw = new byte[data.Length * elementSize];
        Buffer.BlockCopy(data, 0, raw, 0, raw.Length);
        t.Bytes(9, raw);
        initializers.Add(t.ToArray());
        return this;
    }

    /// <summary>A node; attributes are (name, int or float or int[]) pairs.</summary>
    public OnnxGraph Node(string op, string[] ins, string[] outs, string domain = "", params (string Name, object Value)[] attributes)
    {
        var n = new Proto();
        foreach (var i in ins) n.String(1, i);
        foreach (var o in outs) n.String(2, o);
        n.String(3, $"{op}_{nodeCount++}");
        n.String(4, op);
        foreach (var (name, value) in attributes)
        {
            var a = new Proto();
            a.String(1, name);
            switch (value)
            {
                case float f:
                    a.Fixed32(2, BitConverter.SingleToInt32Bits(f));
                    a.Varint(20, 1); // FLOAT
                    break;
                case int i:
                    a.Varint(3, (ulong)(long)i);
                    a.Varint(20, 2); // INT
                    break;
                case long[] ints:
                    foreach (long v in ints) a.Varint(8, (ulong)v);
                    a.Varint(20, 7); // INTS
                    break;
                default:
                    throw new ArgumentException($"attribute {name}: unsupported type {value.GetType()}");
            }

            n.Message(5, a.ToArray());
        }

        if (domain.Length > 0) n.String(7, domain);
        nodes.Add(n.ToArray());
        return this;
    }

    public byte[] ToModel()
    {
        var g = new Proto();
        foreach (var n in nodes) g.Message(1, n);
        g.String(2, "peftsharp_bench");
        foreach (var i in initializers) g.Message(5, i);
        foreach (var i in inputs) g.Message(11, i);
        foreach (var o in outputs) g.Message(12, o);
        var m = new Proto();
        m.Varint(1, 8); // ir_version
        m.String(2, "PeftSharp.Bench");
        m.Message(7, g.ToArray());
        var opset = new Proto();
        opset.String(1, "");
        opset.Varint(2, 17);
        m.Message(8, opset.ToArray());
        var ms = new Proto();
        ms.String(1, "com.microsoft");
        ms.Varint(2, 1);
        m.Message(8, ms.ToArray());
        return m.ToArray();
    }

    private static byte[] ValueInfo(string name, long[] shape, int elemType = 1)
    {
        var dims = new Proto();
        foreach (long d in shape)
        {
            var dim = new Proto();
            dim.Varint(1, (ulong)d);
            dims.Message(1, dim.ToArray());
        }

        var tensor = new Proto();
        tensor.Varint(1, (ulong)elemType); // 1 FLOAT, 7 INT64
        tensor.Message(2, dims.ToArray());
        var type = new Proto();
        type.Message(1, tensor.ToArray());
        var v = new Proto();
        v.String(1, name);
        v.Message(2, type.ToArray());
        return v.ToArray();
    }

    /// <summary>Minimal protobuf writer: varint, fixed32 and length-delimited fields.</summary>
    private sealed class Proto
    {
        private readonly MemoryStream s = new();

        public void Varint(int field, ulong value)
        {
            Key(field, 0);
            Raw(value);
        }

        public void Fixed32(int field, int value)
        {
            Key(field, 5);
            s.Write(BitConverter.GetBytes(value));
        }

        public void Bytes(int field, byte[] data)
        {
            Key(field, 2);
            Raw((ulong)data.Length);
            s.Write(data);
        }

        public void String(int field, string text) => Bytes(field, Encoding.UTF8.GetBytes(text));

        public void Message(int field, byte[] data) => Bytes(field, data);

        public byte[] ToArray() => s.ToArray();

        private void Key(int field, int wire) => Raw((ulong)((field << 3) | wire));

        private void Raw(ulong v)
        {
            while (v >= 0x80)
            {
                s.WriteByte((byte)(v | 0x80));
                v >>= 7;
            }

            s.WriteByte((byte)v);
        }
    }
}
