using System.Buffers.Binary;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;

namespace PeftSharp.Engine;

public static class Precision
{
    /// <summary>Bytes per element.</summary>
    public static int Size(StorageType t) => t == StorageType.F32 ? 4 : 2;

    /// <summary>Decodes little-endian raw bytes of <paramref name="type"/> into fp32.</summary>
    public static void ToFloat(ReadOnlySpan<byte> raw, StorageType type, Span<float> destination)
    {
        int n = destination.Length;
        if (raw.Length != n * Size(type))
        {
            throw new ArgumentException($"{raw.Length} bytes of {type} cannot fill {n} floats (need {n * Size(type)})");
        }

        switch (type)
        {
            case StorageType.F32:
                if (BitConverter.IsLittleEndian)
                {
                    MemoryMarshal.Cast<byte, float>(raw).CopyTo(destination);
                }
                else
                {
                    for (int i = 0; i < n; i++) destination[i] = BinaryPrimitives.ReadSingleLittleEndian(raw.Slice(i * 4, 4));
                }

                break;
            case StorageType.F16:
                if (BitConverter.IsLittleEndian)
                {
                    TensorPrimitives.ConvertToSingle(MemoryMarshal.Cast<byte, Half>(raw), destination);
                }
                else
                {
                    for (int i = 0; i < n; i++) destination[i] = (float)BinaryPrimitives.ReadHalfLittleEndian(raw.Slice(i * 2, 2));
                }

                break;
            case StorageType.BF16:
                // bf16 is the top half of an fp32: shift the 16 bits up.
                for (int i = 0; i < n; i++) destination[i] = BitConverter.Int32BitsToSingle(BinaryPrimitives.ReadUInt16LittleEndian(raw.Slice(i * 2, 2)) << 16);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(type));
        }
    }

    /// <summary>Encodes fp32 values as little-endian <paramref name="type"/>, rounding to nearest-even (NaN stays NaN).</summary>
    public static void FromFloat(ReadOnlySpan<float> source, StorageType type, Span<byte> raw)
    {
        int n = source.Length;
        if (raw.Length != n * Size(type)) throw new ArgumentException($"{raw.Length} bytes cannot hold {n} values of {type}");
        switch (type)
        {
            case StorageType.F32:
                if (BitConverter.IsLittleEndian)
                {
                    MemoryMarshal.AsBytes(source).CopyTo(raw);
                }
                else
                {
                    for (int i = 0; i < n; i++) BinaryPrimitives.WriteSingleLittleEndian(raw.Slice(i * 4, 4), source[i]);
                }

                break;
            case StorageType.F16:
                for (int i = 0; i < n; i++) BinaryPrimitives.WriteHalfLittleEndian(raw.Slice(i * 2, 2), (Half)source[i]);
                break;
            case StorageType.BF16:
                for (int i = 0; i < n; i++) BinaryPrimitives.WriteUInt16LittleEndian(raw.Slice(i * 2, 2), ToBFloat16(source[i]));
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(type));
        }
    }

    /// <summary>fp32 to bf16 bits, round to nearest-even, as torch does; NaN maps to a quiet NaN.</summary>
    public static ushort ToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value)) return (ushort)((bits >> 16) | 0x40);
        uint rounding = 0x7FFF + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }
}
