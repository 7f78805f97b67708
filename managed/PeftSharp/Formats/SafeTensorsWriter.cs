using System.Buffers.Binary;
using System.Text.Json;
using PeftSharp.Engine;

namespace PeftSharp.Formats;

/// <summary>
/// Writes safetensors files: header padded with spaces to a multiple of 8 as the reference writer does, tensors in
/// the order given, contiguous. The file is written under a temporary name and renamed, so a crash never leaves a
/// half-written file at the destination.
/// </summary>
public static class SafeTensorsWriter
{
    public static void Write(string path, IReadOnlyList<SafeTensorData> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var names = new HashSet<string>();
        foreach (var t in tensors)
        {
            if (!names.Add(t.Name)) throw new ArgumentException($"{path}: tensor '{t.Name}' appears twice");
            if (t.Name == "__metadata__") throw new ArgumentException($"{path}: '__metadata__' is reserved and cannot name a tensor");
            long n = t.Shape.Aggregate(1L, (a, d) => a * d);
            if (n != t.Count) throw new ArgumentException($"{path}: tensor '{t.Name}' has {t.Count} values for shape [{string.Join(", ", t.Shape)}]");
            if (t.Ints == null) RefuseNonFinite(path, t);
        }

        using var header = new MemoryStream();
        using (var w = new Utf8JsonWriter(header))
        {
            w.WriteStartObject();
            if (metadata != null && metadata.Count > 0)
            {
                w.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }

            long offset = 0;
            foreach (var t in tensors)
            {
                long bytes = (long)t.Count * t.ElementSize;
                w.WriteStartObject(t.Name);
                w.WriteString("dtype", t.DType);
                w.WriteStartArray("shape");
                foreach (int d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += bytes;
            }

            w.WriteEndObject();
        }

        int pad = (int)((8 - header.Length % 8) % 8);
        for (int i = 0; i < pad; i++) header.WriteByte((byte)' ');
        AtomicFile.Write(path, stream =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)header.Length);
            stream.Write(len);
            header.Position = 0;
            header.CopyTo(stream);
            foreach (var t in tensors) stream.Write(t.Bytes());
        });
    }

    /// <summary>
    /// A model, delta or checkpoint with a NaN or an infinity in it is refused before the file is touched (a merge of
    /// diverged inputs, or fp32 values beyond fp16's range, 65504, that would become infinities on the way out).
    /// </summary>
    private static void RefuseNonFinite(string path, SafeTensorData t)
    {
        var v = t.Values;
        var (bad, first) = FiniteValues.Beyond(v, t.Type == StorageType.F16 ? 65504f : float.MaxValue);
        if (bad > 0)
        {
            throw new PeftSharpInputException($"{path}: refusing to write tensor '{t.Name}': {bad} of its {v.Length} values are NaN or infinite" +
                $"{(t.Type == StorageType.F16 ? " in fp16 (beyond 65504)" : "")}, the first at index {first} ({v[first]})");
        }
    }
}
