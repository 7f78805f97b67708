namespace PeftSharp.Engine;

/// <summary>
/// A contiguous fp32 buffer owned by one device, with a shape and a name used in error messages.
/// The creator owns it and disposes it; a <see cref="Reshape"/> view shares the storage and owns nothing.
/// </summary>
public sealed class Tensor : IDisposable
{
    private readonly int[] shape;
    private readonly bool ownsStorage;
    private bool disposed;

    internal Tensor(Device device, string name, int[] shape, object storage, int offset, bool ownsStorage)
    {
        Device = device;
        Name = name;
        this.shape = shape;
        Storage = storage;
        Offset = offset;
        this.ownsStorage = ownsStorage;
        Length = ShapeUtil.Product(shape, name);
        // Owned storage is exact, or padded by the offset on both sides (Device.CreatePadded).
        if (ownsStorage) device.TrackBytes(StorageBytes);
    }

    private long StorageBytes => 4L * (Length + 2L * Offset);

    public Device Device { get; }

    public string Name { get; }

    public IReadOnlyList<int> Shape => shape;

    public int Rank => shape.Length;

    /// <summary>Number of elements.</summary>
    public int Length { get; }

    public bool IsDisposed => disposed || (Parent?.IsDisposed ?? false);

    /// <summary>Backend storage (float[] on the CPU backend, an ILGPU buffer on ILGPU devices).</summary>
    internal object Storage { get; }

    /// <summary>First element's offset in <see cref="Storage"/>.</summary>
    internal int Offset { get; }

    internal Tensor? Parent { get; private init; }

    /// <summary>Size of dimension <paramref name="axis"/>; negative axes count from the end.</summary>
    public int Dim(int axis) => shape[axis < 0 ? axis + shape.Length : axis];

    /// <summary>A view with another shape over the same elements; disposing it frees nothing.</summary>
    public Tensor Reshape(params int[] newShape)
    {
        ThrowIfDisposed();
        if (ShapeUtil.Product(newShape, Name) != Length)
        {
            throw new ArgumentException($"cannot reshape {this} to {ShapeUtil.Format(newShape)}: {Length} elements vs {ShapeUtil.Product(newShape, Name)}");
        }

        return new Tensor(Device, Name, (int[])newShape.Clone(), Storage, Offset, ownsStorage: false) { Parent = this };
    }

    /// <summary>
    /// A view of the contiguous elements [offset, offset + prod(shape)) with the given shape, sharing storage (for
    /// example rows [len, len + n) of a KV cache); disposing it frees nothing.
    /// </summary>
    public Tensor View(int offset, params int[] shape)
    {
        ThrowIfDisposed();
        int n = ShapeUtil.Product(shape, Name);
        if (offset < 0 || (long)offset + n > Length)
        {
            throw new ArgumentException($"view [{offset}, {(long)offset + n}) {ShapeUtil.Format(shape)} is outside {this} ({Length} elements)");
        }

        return new Tensor(Device, Name, (int[])shape.Clone(), Storage, Offset + offset, ownsStorage: false) { Parent = this };
    }

    /// <summary>Copies the elements to a new host array (synchronizes the device).</summary>
    public float[] ToArray()
    {
        ThrowIfDisposed();
        var result = new float[Length];
        Device.Download(this, result);
        return result;
    }

    /// <summary>Overwrites the elements from host memory.</summary>
    public void CopyFrom(ReadOnlySpan<float> data)
    {
        ThrowIfDisposed();
        if (data.Length != Length)
        {
            throw new ArgumentException($"cannot copy {data.Length} values into {this} ({Length} elements)");
        }

        Device.Upload(this, data);
    }

    internal void ThrowIfDisposed()
    {
        if (IsDisposed) throw new ObjectDisposedException($"tensor {this}");
    }

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        if (!ownsStorage) return;
        Device.ReleaseStorage(Storage);
        Device.TrackBytes(-StorageBytes);
    }

    public override string ToString() => $"'{Name}' {ShapeUtil.Format(shape)}";
}

internal static class ShapeUtil
{
    public static int Product(IReadOnlyList<int> shape, string name)
    {
        long n = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentException($"tensor '{name}' has a negative dimension in {Format(shape)}");
            n *= d;
            if (n > int.MaxValue) throw new ArgumentException($"tensor '{name}' {Format(shape)} has more than {int.MaxValue} elements");
        }

        return (int)n;
    }

    public static string Format(IReadOnlyList<int> shape) => "[" + string.Join(", ", shape) + "]";
}
