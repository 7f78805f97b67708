namespace PeftSharp.Kernels.BitDelta;

/// <summary>
/// Specification of the 1-bit delta family (BitDelta): packing signs, decoding them to a dense delta, and the
/// multi-tenant product y_i += sum_j a_j x_i S_j^T over the slots of row i's variant. Plain loops, double accumulation.
/// </summary>
public static class BitDeltaReference
{
    /// <summary>Packs sign(delta) (N, K) into (N, W) words: bit 1 for delta &gt; 0, else 0 (meaning -1).</summary>
    public static int[] Pack(ReadOnlySpan<float> delta, int n, int k)
    {
        if (delta.Length != n * k) throw new ArgumentException($"delta has {delta.Length} values, not N * K = {n} * {k}");
        int w = BitDeltaShape.WordsPerRow(k);
        var words = new int[n * w];
        for (int r = 0; r < n; r++)
        {
            for (int c = 0; c < k; c++)
            {
                if (delta[r * k + c] > 0f) words[r * w + c / 32] |= 1 << (c % 32);
            }
        }

        return words;
    }

    /// <summary>The sign (+1 or -1) that <paramref name="words"/> (N, W) hold at (row, col).</summary>
    public static int Sign(ReadOnlySpan<int> words, int k, int row, int col) =>
        ((words[row * BitDeltaShape.WordsPerRow(k) + col / 32] >> (col % 32)) & 1) != 0 ? 1 : -1;

    /// <summary>dense (N, K) = beta * dense + alpha * S, S the +-1 matrix <paramref name="words"/> (N, W) holds.</summary>
    public static void Decode(ReadOnlySpan<int> words, float alpha, float beta, Span<float> dense, int n, int k)
    {
        for (int r = 0; r < n; r++)
        {
            for (int c = 0; c < k; c++)
            {
                double prior = beta == 0f ? 0.0 : (double)beta * dense[r * k + c];
                dense[r * k + c] = (float)(prior + (double)alpha * Sign(words, k, r, c));
            }
        }
    }

    /// <summary>
    /// y (M, N) += for every row i with variant v = rowVariant[i] &gt;= 0: sum over slots j in [first[v], first[v] +
    /// rounds[v]) of scales[j] * x_i S_j^T, S_j the slot's (N, W) words at j * N * W of <paramref name="signs"/>.
    /// </summary>
    public static void MixedForward(
        ReadOnlySpan<float> x,          // (M, K)
        Span<float> y,                  // (M, N), accumulated into
        ReadOnlySpan<int> signs,        // (slots, N, W)
        ReadOnlySpan<float> scales,     // (slots)
        ReadOnlySpan<int> first,        // (variants)
        ReadOnlySpan<int> rounds,       // (variants)
        ReadOnlySpan<int> rowVariant,   // (M), -1 for none
        BitDeltaShape s)
    {
        for (int i = 0; i < s.M; i++)
        {
            int v = rowVariant[i];
            if (v < 0) continue;
            for (int n = 0; n < s.N; n++)
            {
                double acc = 0;
                for (int j = first[v]; j < first[v] + rounds[v]; j++)
                {
                    var slot = signs.Slice(j * s.N * s.W, s.N * s.W);
                    double dot = 0;
                    for (int c = 0; c < s.K; c++) dot += (double)x[i * s.K + c] * Sign(slot, s.K, n, c);
                    acc += scales[j] * dot;
                }

                y[i * s.N + n] = (float)(y[i * s.N + n] + acc);
            }
        }
    }
}
