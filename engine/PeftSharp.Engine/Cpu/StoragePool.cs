using System.Collections.Concurrent;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// The CPU backend's tensor arrays, kept by length after their tensors are disposed and handed out again (cleared) for
/// the next tensor of that length. A model repeats its activation shapes every step, so after the first step a forward
/// or backward pass allocates almost nothing: without this, every step put megabytes of large arrays on the large
/// object heap and triggered a full (generation 2) collection per forward pass. Arrays under
/// <see cref="MinLength"/> floats are left to the GC, which handles them cheaply; the pool holds at most
/// <see cref="MaxPooledBytes"/> and drops what does not fit.
/// </summary>
internal sealed class StoragePool
{
    public const int MinLength = 4096;
    public const long MaxPooledBytes = 1L << 30;

    private readonly ConcurrentDictionary<int, ConcurrentStack<float[]>> free = new();
    private long pooledBytes;

    /// <summary>Bytes held for reuse.</summary>
    public long PooledBytes => Interlocked.Read(ref pooledBytes);

    /// <summary>An array of exactly <paramref name="length"/> floats, zero-filled unless <paramref name="clear"/> is false (then a reused array keeps its old values).</summary>
    public float[] Rent(int length, bool clear = true)
    {
        if (length >= MinLength && free.TryGetValue(length, out var stack) && stack.TryPop(out var array))
        {
            Interlocked.Add(ref pooledBytes, -4L * length);
            if (clear) Array.Clear(array);
            return array;
        }

        return new float[length];
    }

    /// <summary>Takes back an array no tensor uses any more.</summary>
    public void Return(float[] array)
    {
        if (array.Length < MinLength) return;
        long bytes = 4L * array.Length;
        if (Interlocked.Add(ref pooledBytes, bytes) > MaxPooledBytes)
        {
            Interlocked.Add(ref pooledBytes, -bytes);
            return;
        }

        free.GetOrAdd(array.Length, _ => new ConcurrentStack<float[]>()).Push(array);
    }

    /// <summary>Drops every pooled array; returns the bytes dropped.</summary>
    public long Clear()
    {
        long dropped = 0;
        foreach (var stack in free.Values)
        {
            while (stack.TryPop(out var array))
            {
                dropped += 4L * array.Length;
                Interlocked.Add(ref pooledBytes, -4L * array.Length);
            }
        }

        return dropped;
    }
}
