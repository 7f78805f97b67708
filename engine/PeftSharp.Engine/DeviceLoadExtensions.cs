namespace PeftSharp.Engine;

/// <summary>Creating tensors from half-precision data.</summary>
public static class DeviceLoadExtensions
{
    /// <summary>A fp32 tensor from little-endian raw bytes of fp32, fp16 or bf16 (converted on load).</summary>
    public static Tensor FromRaw(this Device device, string name, ReadOnlySpan<byte> raw, StorageType type, params int[] shape)
    {
        int n = ShapeUtil.Product(shape, name);
        if (raw.Length != n * Precision.Size(type))
        {
            throw new ArgumentException($"tensor '{name}' {ShapeUtil.Format(shape)} of {type} needs {n * Precision.Size(type)} bytes, got {raw.Length}");
        }

        var values = new float[n];
        Precision.ToFloat(raw, type, values);
        return device.FromArray(name, values, shape);
    }
}
