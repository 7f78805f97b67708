namespace PeftSharp.Kernels.Sparse;

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
