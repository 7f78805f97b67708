using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace PeftSharp.Bench;

/// <summary>
/// Measures the machine's memory read bandwidth: every core sums its share of a 512 MiB array (far beyond the
/// caches) with eight independent Vector256 accumulators, so the adds never wait on each other and only memory
/// limits the pass; the best of several passes is kept. The speed of light for any kernel that must stream its
/// weights once per call.
/// </summary>
public static class BandwidthProbe
{
    private static readonly Lazy<double> Measured = new(Measure);

    /// <summary>Read bandwidth in GB/s (10^9 bytes per second) with all cores.</summary>
    public static double GBps => Measured.Value;

    private static double Measure()
    {
        const int n = 128 << 20; // 512 MiB of floats
        var data = new float[n];
        data.AsSpan().Fill(1f);
        int threads = Environment.ProcessorCount;
        int per = n / threads;
        double best = 0;
        for (int run = 0; run < 8; run++)
        {
            var sw = Stopwatch.StartNew();
            double total = 0;
            Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, t =>
            {
                float s = Sum(data.AsSpan(t * per, per));
                lock (data) total += s;
            });
            best = Math.Max(best, n * 4.0 / sw.Elapsed.TotalSeconds / 1e9);
            if (total != (double)per * threads) throw new InvalidOperationException("bandwidth probe summed wrongly");
        }

        return best;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe float Sum(Span<float> span)
    {
        fixed (float* p = span)
        {
            Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
            int i = 0;
            for (; i + 64 <= span.Length; i += 64)
            {
                a0 += Vector256.Load(p + i);
                a1 += Vector256.Load(p + i + 8);
                a2 += Vector256.Load(p + i + 16);
                a3 += Vector256.Load(p + i + 24);
                a4 += Vector256.Load(p + i + 32);
                a5 += Vector256.Load(p + i + 40);
                a6 += Vector256.Load(p + i + 48);
                a7 += Vector256.Load(p + i + 56);
            }

            float s = Vector256.Sum(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)));
            for (; i < span.Length; i++) s += p[i];
            return s;
        }
    }
}
