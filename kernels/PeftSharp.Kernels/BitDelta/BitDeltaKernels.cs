using ILGPU;

namespace PeftSharp.Kernels.BitDelta;

/// <summary>
/// 1-bit delta kernels: decode packed signs to a dense delta, and the multi-tenant sign product that reads the packed
/// words directly (no dense delta is formed; the base product is the ordinary matmul, shared by the whole batch).
/// Reference: <see cref="BitDeltaReference"/>.
/// </summary>
public static class BitDeltaKernels
{
    /// <summary>dense[n, k] = beta * dense[n, k] + alpha * S[n, k]. One thread per element.</summary>
    public static void DecodeKernel(
        Index1D index,               // over N * K
        ArrayView<int> words,        // (N, W)
        ArrayView<float> dense,      // (N, K)
        float alpha,
        float beta,
        BitDeltaShape s)
    {
        int n = index / s.K;
        int k = index - n * s.K;
        int bit = (words[n * s.W + (k >> 5)] >> (k & 31)) & 1;
        float sign = bit != 0 ? alpha : -alpha;
        dense[index] = beta == 0f ? sign : beta * dense[index] + sign;
    }

    /// <summary>
    /// y[i, n] += sum over row i's variant slots j of scales[j] * sum_k x[i, k] * S_j[n, k]. One thread per (i, n);
    /// rows without a variant are skipped. The sign flips x's sign bit instead of multiplying.
    /// </summary>
    public static void MixedKernel(
        Index1D index,               // over M * N
        ArrayView<float> x,          // (M, K)
        ArrayView<int> signs,        // (slots, N, W)
        ArrayView<float> scales,     // (slots)
        ArrayView<int> first,        // (variants)
        ArrayView<int> rounds,       // (variants)
        ArrayView<int> rowVariant,   // (M)
        ArrayView<float> y,          // (M, N)
        BitDeltaShape s)
    {
        int i = index / s.N;
        int n = index - i * s.N;
        int v = rowVariant[i];
        if (v < 0) return;
        int xo = i * s.K;
        float total = 0f;
        for (int j = first[v]; j < first[v] + rounds[v]; j++)
        {
            int wo = (j * s.N + n) * s.W;
            float acc = 0f;
            for (int w = 0; w < s.W; w++)
            {
                int word = signs[wo + w];
                int k0 = w << 5;
                int end = s.K - k0 < 32 ? s.K - k0 : 32;
                for (int b = 0; b < end; b++)
                {
                    float xv = x[xo + k0 + b];
                    acc += ((word >> b) & 1) != 0 ? xv : -xv;
                }
            }

            total += scales[j] * acc;
        }

        y[index] += total;
    }
}
