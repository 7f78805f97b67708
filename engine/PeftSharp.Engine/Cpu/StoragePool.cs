using System.Collections.Concurrent;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// The CPU backend's tensor arrays, kept by length after their tensors are disposed and handed out again (cleared) for
/// the next tensor of that length. A model repeats its activation shapes every step, so after the first step a forward
/// or backward pass allocates almost nothing: without this, every step put megabytes of large arrays on the large
/// object heap and triggered a full (generation 2) collection per forward pass. Arrays under
/// <see cref="MinLength"/> floats are left to the GC, which handles them cheaply.
/// What the pool keeps is capped by use: at most twice the peak of bytes live at once in pooled-size arrays (a
/// training step's arrays of distinct lengths add up to more than its live peak, and all of them should come back
/// the next step), at least <see cref="MinCapBytes"/>, never more than <see cref="MaxPooledBytes"/>. When a returned
/// array does not fit, the lengths used longest ago are dropped first. Serving batches of varying sizes makes a new
/// set of lengths for every batch shape; without the eviction those stale lengths filled the pool to its 1 GiB limit
/// (a 1.2 GiB working set for 59 MiB of live tensors) and the lengths in use were the ones turned away.
/// </summary>
internal sealed class StoragePool
{
    public const int MinLength = 4096;
    public const long MaxPooledBytes = 1L << 30;

    /// <summary>The pool may always keep this much, whatever the live peak (small models' steps fit in it whole).</summary>
    public const long MinCapBytes = 16L << 20;

    private readonly ConcurrentDictionary<int, Bucket> free = new();
    private long pooledBytes;
    private long liveBytes;
    private long peakLiveBytes;
    private long clock;

    /// <summary>Bytes held for reuse.</summary>
    public long PooledBytes => Interlocked.Read(ref pooledBytes);

    /// <summary>Bytes in pooled-size arrays rented and not yet returned, and the most there ever were at once.</summary>
    public (long Live, long PeakLive) LiveBytes => (Interlocked.Read(ref liveBytes), Interlocked.Read(ref peakLiveBytes));

    /// <summary>What the pool may hold now: twice the live peak, within [<see cref="MinCapBytes"/>, <see cref="MaxPooledBytes"/>].</summary>
    public long CapBytes => Math.Clamp(2 * Interlocked.Read(ref peakLiveBytes), MinCapBytes, MaxPooledBytes);

    /// <summary>Rents of pooled-size arrays the pool could not serve (fresh allocations).</summary>
    public long Misses => Interlocked.Read(ref misses);

    private long misses;

    private sealed class Bucket
    {
        public readonly ConcurrentStack<float[]> Arrays = new();
        public long LastUse;
    }

    /// <summary>An array of exactly <paramref name="length"/> floats, zero-filled unless <paramref name="clear"/> is false (then a reused array keeps its old values).</summary>
    public float[] Rent(int length, bool clear = true)
    {
        if (length < MinLength) return new float[length];
        long live = Interlocked.Add(ref liveBytes, 4L * length);
        long peak;
        while (live > (peak = Interlocked.Read(ref peakLiveBytes)) && Interlocked.CompareExchange(ref peakLiveBytes, live, peak) != peak)
        {
        }

        if (free.TryGetValue(length, out var bucket))
        {
            bucket.LastUse = Interlocked.Increment(ref clock);
            if (bucket.Arrays.TryPop(out var array))
            {
                Interlocked.Add(ref pooledBytes, -4L * length);
                if (clear) Array.Clear(array);
                return array;
            }
        }

        Interlocked.Increment(ref misses);
        return new float[length];
    }

    /// <summary>Takes back an array no tensor uses any more.</summary>
    public void Return(float[] array)
    {
        if (array.Length < MinLength) return;
        long bytes = 4L * array.Length;
        if (Interlocked.Add(ref liveBytes, -bytes) < 0) Interlocked.Exchange(ref liveBytes, 0); // an array the pool did not hand out
        var bucket = free.GetOrAdd(array.Length, _ => new Bucket());
        bucket.LastUse = Interlocked.Increment(ref clock);
        long cap = CapBytes;
        if (bytes > cap) return;
        while (Interlocked.Read(ref pooledBytes) + bytes > cap)
        {
            if (!EvictOldest(bucket)) return; // nothing older to drop: the returned array is the one left to the GC
        }

        Interlocked.Add(ref pooledBytes, bytes);
        bucket.Arrays.Push(array);
    }

    /// <summary>Drops one array of the length used longest ago (not <paramref name="keep"/>'s); false when there is none.</summary>
    private bool EvictOldest(Bucket keep)
    {
        Bucket? oldest = null;
        foreach (var b in free.Values)
        {
            if (b != keep && !b.Arrays.IsEmpty && (oldest == null || b.LastUse < oldest.LastUse)) oldest = b;
        }

        if (oldest == null || !oldest.Arrays.TryPop(out var dropped)) return false;
        Interlocked.Add(ref pooledBytes, -4L * dropped.Length);
        return true;
    }

    /// <summary>Drops every pooled array; returns the bytes dropped.</summary>
    public long Clear()
    {
        long dropped = 0;
        foreach (var bucket in free.Values)
        {
            while (bucket.Arrays.TryPop(out var array))
            {
                dropped += 4L * array.Length;
                Interlocked.Add(ref pooledBytes, -4L * array.Length);
            }
        }

        return dropped;
    }
}
