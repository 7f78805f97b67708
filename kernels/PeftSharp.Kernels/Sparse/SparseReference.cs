namespace PeftSharp.Kernels.Sparse;

/// <summary>Specification of <see cref="SparseKernels"/>: plain loops, double where sums are long.</summary>
public static class SparseReference
{
    public static void MaskedAdamW(float[] p, float[] g, int[] idx, float[] m, float[] v, float lr, float beta1, float beta2, float eps, float weightDecay, int step)
    {
        double bc1 = 1 - Math.Pow(beta1, step), bc2 = 1 - Math.Pow(beta2, step);
        for (int j = 0; j < idx.Length; j++)
        {
            int i = idx[j];
            double gi = g[i];
            double pi = p[i] * (1.0 - (double)lr * weightDecay);
            double mi = beta1 * (double)m[j] + (1 - beta1) * gi;
            double vi = beta2 * (double)v[j] + (1 - beta2) * gi * gi;
            m[j] = (float)mi;
            v[j] = (float)vi;
            p[i] = (float)(pi - lr * (mi / bc1) / (Math.Sqrt(vi / bc2) + eps));
        }
    }

    public static void Dare(ReadOnlySpan<float> x, Span<float> y, float p, int seed)
    {
        for (int i = 0; i < x.Length; i++) y[i] = SparseKernels.Uniform(seed, i) >= p ? (p == 0f ? x[i] : (float)(x[i] / (1.0 - p))) : 0f;
    }

    /// <summary>y (M, N) += per row r with variant v &gt;= 0: x_r times v's sparse delta (N, K) transposed, the delta given as (flat index, value) pairs.</summary>
    public static void MixedForward(ReadOnlySpan<float> x, Span<float> y, IReadOnlyList<(int[] Index, float[] Values)> deltas, ReadOnlySpan<int> rowVariant, int n, int k)
    {
        for (int r = 0; r < rowVariant.Length; r++)
        {
            int v = rowVariant[r];
            if (v < 0) continue;
            var acc = new double[n];
            var (index, values) = deltas[v];
            for (int e = 0; e < index.Length; e++) acc[index[e] / k] += (double)values[e] * x[r * k + index[e] % k];
            for (int o = 0; o < n; o++) y[r * n + o] = (float)(y[r * n + o] + acc[o]);
        }
    }
}
