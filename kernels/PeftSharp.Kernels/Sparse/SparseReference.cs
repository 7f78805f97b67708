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

/// <summary>Specification of <see cref="SelectKernels"/>: score every entry, sort (largest first, ties by lower index), cut the band.</summary>
public static class SelectReference
{
    public static double Score(ReadOnlySpan<float> x, int i, SelectScore score) =>
        score.Mode == SelectScore.Uniform ? SparseKernels.Uniform(score.Seed, i) : float.IsNaN(x[i]) ? double.PositiveInfinity : Math.Abs((double)x[i]);

    /// <summary>Ascending indices of the entries at ranks [skip, skip + count). NaN ranks first (as +inf, before it by index).</summary>
    public static int[] Band(float[] x, int skip, int count, SelectScore score)
    {
        int n = score.Mode == SelectScore.Uniform && x.Length == 0 ? 0 : x.Length;
        var order = Enumerable.Range(0, n)
            .OrderByDescending(i => score.Mode == SelectScore.Magnitude && float.IsNaN(x[i]) ? 1 : 0)
            .ThenByDescending(i => Score(x, i, score))
            .ThenBy(i => i)
            .ToArray();
        return order.Skip(skip).Take(count).OrderBy(i => i).ToArray();
    }
}
