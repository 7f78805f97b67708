using ILGPU;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Lora;

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

    /// <summary>dt[i, q] = s_a * dy_i . B_a[:, q] for q &lt; R_a, else 0: the gradient reaching t = x A^T. One thread per (i, q).</summary>
    public static void DtKernel(
        Index1D index,               // over M * RMax
        ArrayView<float> dy,         // (M, N)
        ArrayView<float> bPool,      // concatenated B_a (N, R_a)
        ArrayView<int> bOffsets,     // (adapters)
        ArrayView<int> ranks,        // (adapters)
        ArrayView<float> scales,     // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> dt,         // (M, RMax)
        LoraBatchShape s)
    {
        int i = index / s.RMax;
        int q = index - i * s.RMax;
        int a = rowAdapter[i];
        float acc = 0f;
        if (a >= 0 && q < ranks[a])
        {
            int r = ranks[a];
            for (int n = 0; n < s.N; n++) acc += dy[i * s.N + n] * bPool[bOffsets[a] + n * r + q];
            acc *= scales[a];
        }

        dt[index] = acc;
    }

    /// <summary>
    /// dB_a[n, q] += s_a * sum over the rows i of adapter a of dy[i, n] t[i, q]. One thread per pool entry; the owning
    /// adapter is found from the offsets (pools hold few adapters).
    /// </summary>
    public static void GradBKernel(
        Index1D e,                   // over the B pool
        ArrayView<float> dy,         // (M, N)
        ArrayView<float> t,          // (M, RMax)
        ArrayView<int> bOffsets,     // (adapters)
        ArrayView<int> ranks,        // (adapters)
        ArrayView<float> scales,     // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> dbPool,     // like the B pool
        int adapters,
        LoraBatchShape s)
    {
        int a = adapters - 1;
        while (a > 0 && bOffsets[a] > e) a--;
        int r = ranks[a];
        int local = e - bOffsets[a];
        int n = local / r;
        int q = local - n * r;
        float acc = 0f;
        for (int i = 0; i < s.M; i++)
        {
            if (rowAdapter[i] == a) acc += dy[i * s.N + n] * t[i * s.RMax + q];
        }

        dbPool[e] += scales[a] * acc;
    }

    /// <summary>dA_a[q, k] += sum over the rows i of adapter a of dt[i, q] x[i, k]. One thread per pool entry.</summary>
    public static void GradAKernel(
        Index1D e,                   // over the A pool
        ArrayView<float> x,          // (M, K)
        ArrayView<float> dt,         // (M, RMax)
        ArrayView<int> aOffsets,     // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> daPool,     // like the A pool
        int adapters,
        LoraBatchShape s)
    {
        int a = adapters - 1;
        while (a > 0 && aOffsets[a] > e) a--;
        int local = e - aOffsets[a];
        int q = local / s.K;
        int k = local - q * s.K;
        float acc = 0f;
        for (int i = 0; i < s.M; i++)
        {
            if (rowAdapter[i] == a) acc += dt[i * s.RMax + q] * x[i * s.K + k];
        }

        daPool[e] += acc;
    }

    /// <summary>dx[i, k] += dt_i . A_a[:, k]. One thread per (i, k); rows without an adapter are skipped.</summary>
    public static void GradXKernel(
        Index1D index,               // over M * K
        ArrayView<float> dt,         // (M, RMax)
        ArrayView<float> aPool,      // concatenated A_a (R_a, K)
        ArrayView<int> aOffsets,     // (adapters)
        ArrayView<int> ranks,        // (adapters)
        ArrayView<int> rowAdapter,   // (M)
        ArrayView<float> dx,         // (M, K)
        LoraBatchShape s)
    {
        int i = index / s.K;
        int k = index - i * s.K;
        int a = rowAdapter[i];
        if (a < 0) return;
        float acc = 0f;
        for (int q = 0; q < ranks[a]; q++) acc += dt[i * s.RMax + q] * aPool[aOffsets[a] + q * s.K + k];
        dx[index] += acc;
    }

    /// <summary>
    /// DoRA in a mixed batch: y[i, n] *= scales[slot[i], n] (m / ||W + s B A||_row of the row's adapter) for rows with
    /// a slot, after their LoRA delta was added. One thread per (i, n).
    /// </summary>
    public static void DoraScaleKernel(
        Index1D index,               // over M * N
        ArrayView<float> y,          // (M, N)
        ArrayView<float> scales,     // (slots, N)
        ArrayView<int> rowSlot,      // (M), -1: not DoRA
        int n)
    {
        int i = index / n;
        int slot = rowSlot[i];
        if (slot < 0) return;
        y[index] *= scales[slot * n + (index - i * n)];
    }
}
