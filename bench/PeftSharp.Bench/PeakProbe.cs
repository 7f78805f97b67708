using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace PeftSharp.Bench;

/// <summary>
/// Measures the machine's fp32 FMA peak: every core runs 10 independent chains of Vector256 fused multiply-adds
/// (enough to cover FMA latency x ports), and the best of several runs is kept. On the 2-core EPYC here 512-bit
/// FMAs measured the same per core (double-pumped), so the 256-bit figure is the machine's limit for our kernels.
/// </summary>
public static class PeakProbe
{
    private static readonly Lazy<double> Peak = new(Measure);

    /// <summary>Peak GFLOP/s with all cores.</summary>
    public static double GFlops => Peak.Value;

    private static double Measure()
    {
        const long iterations = 20_000_000;
        int threads = Environment.ProcessorCount;
        double best = 0;
        for (int run = 0; run < 10; run++)
        {
            var sw = Stopwatch.StartNew();
            Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, _ => Chains(iterations));
            double flops = threads * iterations * 10.0 * 2 * Vector256<float>.Count;
            best = Math.Max(best, flops / sw.Elapsed.TotalSeconds / 1e9);
        }

        return best;
    }

    // Fully optimized from the first call: at tier 0 or through on-stack replacement the loop measured 35% lower.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float Chains(long n)
    {
        var a0 = Vector256.Create(1f);
        Vector256<float> a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
        var b = Vector256.Create(0.9999999f);
        var c = Vector256.Create(1e-7f);
        for (long i = 0; i < n; i++)
        {
            a0 = Vector256.FusedMultiplyAdd(a0, b, c);
            a1 = Vector256.FusedMultiplyAdd(a1, b, c);
            a2 = Vector256.FusedMultiplyAdd(a2, b, c);
            a3 = Vector256.FusedMultiplyAdd(a3, b, c);
            a4 = Vector256.FusedMultiplyAdd(a4, b, c);
            a5 = Vector256.FusedMultiplyAdd(a5, b, c);
            a6 = Vector256.FusedMultiplyAdd(a6, b, c);
            a7 = Vector256.FusedMultiplyAdd(a7, b, c);
            a8 = Vector256.FusedMultiplyAdd(a8, b, c);
            a9 = Vector256.FusedMultiplyAdd(a9, b, c);
        }

        return (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9).GetElement(0);
    }
}
