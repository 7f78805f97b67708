namespace PeftSharp.Kernels.LowRank;

/// <summary>
/// Specification of the mixed-adapter LoRA delta (Punica's BGMV): for every row i with adapter a = rowAdapter[i] &gt;= 0,
/// y_i += s_a * (x_i A_a^T) B_a^T; rows with -1 are untouched. B A is never formed. Double accumulation.
/// </summary>
public static class LoraReference
{
    public static void MixedForward(
        ReadOnlySpan<float> x,          // (M, K)
        Span<float> y,                  // (M, N), accumulated into
        ReadOnlySpan<float> aPool,      // concatenated A_a (R_a, K)
        ReadOnlySpan<float> bPool,      // concatenated B_a (N, R_a)
        ReadOnlySpan<int> aOffsets,     // (adapters)
        ReadOnlySpan<int> bOffsets,     // (adapters)
        ReadOnlySpan<int> ranks,        // (adapters)
        ReadOnlySpan<float> scales,     // (adapters)
        ReadOnlySpan<int> rowAdapter,   // (M), -1 for none
        LoraBatchShape s)
    {
        var t = new double[Math.Max(1, s.RMax)];
        for (int i = 0; i < s.M; i++)
        {
            int a = rowAdapter[i];
            if (a < 0) continue;
            int r = ranks[a];
            for (int q = 0; q < r; q++)
            {
                double acc = 0;
                for (int k = 0; k < s.K; k++) acc += (double)x[i * s.K + k] * aPool[aOffsets[a] + q * s.K + k];
                t[q] = acc;
            }

            for (int n = 0; n < s.N; n++)
            {
                double acc = 0;
                for (int q = 0; q < r; q++) acc += t[q] * bPool[bOffsets[a] + n * r + q];
                y[i * s.N + n] = (float)(y[i * s.N + n] + scales[a] * acc);
            }
        }
    }
}
