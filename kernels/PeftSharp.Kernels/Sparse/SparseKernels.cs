using ILGPU;
using ILGPU.Algorithms;

namespace PeftSharp.Kernels.Sparse;

/// <summary>
/// Sparse-mask kernels over an index set of a dense tensor: optimizer steps that touch (and keep state for) only the
/// masked entries, scatter-add of a sparse delta (apply / remove), gather, DARE's drop-and-rescale with a
/// counter-based random number (the same mask on every backend for a seed), and the per-row sparse-delta product for
/// the mixed serving batch. Indices within one set are distinct, so no two threads write one element and no atomics
/// are needed. Reference: <see cref="SparseReference"/>.
/// </summary>
public static class SparseKernels
{
    /// <summary>AdamW on p[idx[j]] with moments m[j], v[j]: state for the masked entries only. One thread per entry.</summary>
    public static void MaskedAdamWKernel(
        Index1D j,
        ArrayView<float> p,   // (numel) parameter
        ArrayView<float> g,   // (numel) gradient
        ArrayView<int> idx,   // (nnz) flat indices into p
        ArrayView<float> m,   // (nnz) first moment
        ArrayView<float> v,   // (nnz) second moment
        float lr, float beta1, float beta2, float eps, float weightDecay, float bc1, float bc2)
    {
        int i = idx[j];
        float gi = g[i];
        float pi = p[i] * (1f - lr * weightDecay);
        float mi = beta1 * m[j] + (1f - beta1) * gi;
        float vi = beta2 * v[j] + (1f - beta2) * gi * gi;
        m[j] = mi;
        v[j] = vi;
        p[i] = pi - lr * (mi / bc1) / (XMath.Sqrt(vi / bc2) + eps);
    }

    /// <summary>SGD on p[idx[j]] with momentum buffer b[j] (read only when momentum is not 0).</summary>
    public static void MaskedSgdKernel(
        Index1D j,
        ArrayView<float> p,   // (numel)
        ArrayView<float> g,   // (numel)
        ArrayView<int> idx,   // (nnz)
        ArrayView<float> b,   // (nnz) momentum buffer
        float lr, float momentum, float weightDecay)
    {
        int i = idx[j];
        float gi = g[i] + weightDecay * p[i];
        if (momentum != 0f)
        {
            float bi = momentum * b[j] + gi;
            b[j] = bi;
            gi = bi;
        }

        p[i] -= lr * gi;
    }

    /// <summary>
    /// A uniform number in [0, 1) from (seed, i) alone: a 32-bit integer hash (lowbias32) of i mixed with the seed,
    /// top 24 bits scaled. The same on every backend and independent of how the work is split.
    /// </summary>
    public static float Uniform(int seed, int i)
    {
        uint h = (uint)i * 0x9E3779B9u ^ (uint)seed * 0x85EBCA6Bu;
        h ^= h >> 16;
        h *= 0x7FEB352Du;
        h ^= h >> 15;
        h *= 0x846CA68Bu;
        h ^= h >> 16;
        return (h >> 8) * (1f / 16777216f);
    }

    /// <summary>w[idx[j]] += alpha * values[j].</summary>
    public static void ScatterAddKernel(Index1D j, ArrayView<float> w, ArrayView<int> idx, ArrayView<float> values, float alpha) =>
        w[idx[j]] += alpha * values[j];

    /// <summary>w[idx[j]] = values[j] (indices distinct).</summary>
    public static void ScatterKernel(Index1D j, ArrayView<float> w, ArrayView<int> idx, ArrayView<float> values) => w[idx[j]] = values[j];

    /// <summary>values[j] = w[idx[j]].</summary>
    public static void GatherKernel(Index1D j, ArrayView<float> w, ArrayView<int> idx, ArrayView<float> values) => values[j] = w[idx[j]];

    /// <summary>
    /// DARE: y[i] = x[i] / (1 - p) where the counter-based uniform u(seed, i) &gt;= p, else 0. p = 0 copies x exactly.
    /// </summary>
    public static void DareKernel(Index1D i, ArrayView<float> x, ArrayView<float> y, float p, int seed)
    {
        float u = Uniform(seed, i);
        y[i] = u >= p ? (p == 0f ? x[i] : x[i] / (1f - p)) : 0f;
    }

    /// <summary>
    /// y[r, n] += for the row's variant v: sum over the entries of row n of v's sparse delta (CSR) of value * x[r, col].
    /// One thread per (r, n); rows without a variant are skipped.
    /// </summary>
    public static void MixedKernel(
        Index1D index,             // over M * N
        ArrayView<float> x,        // (M, K)
        ArrayView<int> rowStart,   // (variants * (N + 1)) CSR row pointers, per variant, into cols/vals
        ArrayView<int> cols,       // (total nnz)
        ArrayView<float> vals,     // (total nnz)
        ArrayView<int> rowVariant, // (M)
        ArrayView<float> y,        // (M, N)
        int n, int k)
    {
        int r = index / n;
        int o = index - r * n;
        int v = rowVariant[r];
        if (v < 0) return;
        int at = v * (n + 1) + o;
        float acc = 0f;
        for (int e = rowStart[at]; e < rowStart[at + 1]; e++) acc += vals[e] * x[r * k + cols[e]];
        y[index] += acc;
    }
}
