using ILGPU;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.LowRank;

/// <summary>
/// Mixed-adapter LoRA in two launches over the whole batch, whatever mix of adapters and ranks it holds:
/// shrink t = x A_a^T (rank-wide), then expand y += s_a t B_a^T. Reference: <see cref="LoraReference"/>.
/// </summary>
public static class LoraKernels
{
    /// <summary>t[i, q] = x_i . A_a[q] for q &lt; R_a, else 0. One thread per (i, q).</summary>
    public static void ShrinkKernel(
        Index1D index,               // over M * RMax
        ArrayView<float> x,          // (M, K)
        ArrayView<float> aPool,      // concatenated A_a (R_a, K)
        ArrayView<int> aOffsets,     // (adapters)
        ArrayView<int> ranks,        // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> t,          // (M, RMax)
        LoraBatchShape s)
    {
        int i = index / s.RMax;
        int q = index - i * s.RMax;
        int a = rowAdapter[i];
        float acc = 0f;
        if (a >= 0 && q < ranks[a])
        {
            int ao = aOffsets[a] + q * s.K;
            int xo = i * s.K;
            for (int k = 0; k < s.K; k++) acc += x[xo + k] * aPool[ao + k];
        }

        t[index] = acc;
    }

    /// <summary>y[i, n] += s_a * t_i . B_a[n] (rank-long dot). One thread per (i, n); rows without an adapter are skipped.</summary>
    public static void ExpandKernel(
        Index1D index,               // over M * N
        ArrayView<float> t,          // (M, RMax)
        ArrayView<float> bPool,      // concatenated B_a (N, R_a)
        ArrayView<int> bOffsets,     // (adapters)
        ArrayView<int> ranks,        // (adapters)
        ArrayView<float> scales,     // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> y,          // (M, N)
        LoraBatchShape s)
    {
        int i = index / s.N;
        int n = index - i * s.N;
        int a = rowAdapter[i];
        if (a < 0) return;
        int r = ranks[a];
        int bo = bOffsets[a] + n * r;
        int to = i * s.RMax;
        float acc = 0f;
        for (int q = 0; q < r; q++) acc += t[to + q] * bPool[bo + q];
        y[index] += scales[a] * acc;
    }
}
