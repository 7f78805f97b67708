using System.Buffers.Binary;
using PeftSharp.Engine;

namespace PeftSharp.Formats;

/// <summary>A tensor to write: fp32 values, a shape, and the storage type on disk; or, with <see cref="Ints"/>, an I32 tensor.</summary>
public sealed record SafeTensorData(string Name, float[] Values, int[] Shape, StorageType Type = StorageType.F32)
{
    /// <summary>When set, the tensor is written as I32 from these values (packed bit words, indices) and Values is ignored.</summary>
    public int[]? Ints { get; init; }

    public static SafeTensorData Int32(string name, int[] values, int[] shape) => new(name, Array.Empty<float>(), shape) { Ints = values };

    internal int Count => Ints?.Length ?? Values.Length;

    internal string DType => Ints != null ? "I32" : Type.ToString();

    internal int ElementSize => Ints != null ? 4 : Precision.Size(Type);

    internal byte[] Bytes()
    {
        var raw = new byte[Count * ElementSize];
        if (Ints != null)
        {
            for (int i = 0; i < Ints.Length; i++) BinaryPrimitives.WriteInt32LittleEndian(raw.AsSpan(4 * i), Ints[i]);
        }
        else
        {
            Precision.FromFloat(Values, Type, raw);
        }

        return raw;
    }
}
