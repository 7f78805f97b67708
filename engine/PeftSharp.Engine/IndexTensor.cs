namespace PeftSharp.Engine;

/// <summary>
/// Int32 indices on a device (token ids, targets, positions). Immutable after creation; the host copy is kept so
/// that ranges are checked before any kernel runs and backends can plan scatters without a download.
/// </summary>
public sealed class IndexTensor : IDisposable
{
    private readonly int[] shape;
    private bool disposed;

    internal IndexTensor(Device device, string name, int[] shape, int[] host, object storage)
    {
        Device = device;
        Name = name;
        this.shape = shape;
        Host = host;
        Storage = storage;
        Length = ShapeUtil.Product(shape, name);
        device.TrackBytes(4L * Length);
    }

    public Device Device { get; }

    public string Name { get; }

    public IReadOnlyList<int> Shape => shape;

    public int Length { get; }

    /// <summary>The values, as uploaded.</summary>
    public ReadOnlySpan<int> Values => Host;

    internal int[] Host { get; }

    internal object Storage { get; }

    public bool IsDisposed => disposed;

    internal void ThrowIfDisposed()
    {
        if (disposed) throw new ObjectDisposedException($"index tensor {this}");
    }

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        Device.ReleaseStorage(Storage);
        Device.TrackBytes(-4L * Length);
    }

    public override string ToString() => $"'{Name}' {ShapeUtil.Format(shape)}";
}
