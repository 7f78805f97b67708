namespace PeftSharp.Kernels.Core;

/// <summary>Specification of embedding lookup and its scatter-add backward.</summary>
public static class EmbeddingReference
{
    public static void Forward(ReadOnlySpan<int> ids, ReadOnlySpan<float> table, Span<float> y, int dim)
    {
        for (int n = 0; n < ids.Length; n++) table.Slice(ids[n] * dim, dim).CopyTo(y.Slice(n * dim, dim));
    }

    /// <summary>dtable[v] = sum of dy[n] over tokens n with ids[n] = v; rows no token uses are 0. Overwrites dtable.</summary>
    public static void Backward(ReadOnlySpan<int> ids, ReadOnlySpan<float> dy, Span<float> dtable, int dim)
    {
        var acc = new double[dtable.Length];
        for (int n = 0; n < ids.Length; n++)
        for (int d = 0; d < dim; d++)
            acc[ids[n] * dim + d] += dy[n * dim + d];
        for (int i = 0; i < acc.Length; i++) dtable[i] = (float)acc[i];
    }
}
