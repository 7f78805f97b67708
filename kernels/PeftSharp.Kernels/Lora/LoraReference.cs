namespace PeftSharp.Kernels.Lora;

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

    /// <summary>
    /// Backward of <see cref="MixedForward"/> with the base frozen: for each row i of adapter a, with t = x_i A_a^T and
    /// dt = s_a dy_i B_a: dB_a += s_a dy_i^T t, dA_a += dt^T x_i, dx_i += dt A_a. Accumulates into dx and the pools.
    /// </summary>
    public static void MixedBackward(
        ReadOnlySpan<float> x, ReadOnlySpan<float> dy, // (M, K), (M, N)
        ReadOnlySpan<float> aPool, ReadOnlySpan<float> bPool, ReadOnlySpan<int> aOffsets, ReadOnlySpan<int> bOffsets,
        ReadOnlySpan<int> ranks, ReadOnlySpan<float> scales, ReadOnlySpan<int> rowAdapter,
        Span<float> dx, Span<float> daPool, Span<float> dbPool, LoraBatchShape s)
    {
        for (int i = 0; i < s.M; i++)
        {
            int a = rowAdapter[i];
            if (a < 0) continue;
            int r = ranks[a];
            var t = new double[r];
            var dt = new double[r];
            for (int q = 0; q < r; q++)
            {
                double acc = 0, g = 0;
                for (int k = 0; k < s.K; k++) acc += (double)x[i * s.K + k] * aPool[aOffsets[a] + q * s.K + k];
                for (int n = 0; n < s.N; n++) g += (double)dy[i * s.N + n] * bPool[bOffsets[a] + n * r + q];
                t[q] = acc;
                dt[q] = scales[a] * g;
            }

            for (int n = 0; n < s.N; n++)
            {
                for (int q = 0; q < r; q++) dbPool[bOffsets[a] + n * r + q] += (float)(scales[a] * dy[i * s.N + n] * t[q]);
            }

            for (int q = 0; q < r; q++)
            {
                for (int k = 0; k < s.K; k++) daPool[aOffsets[a] + q * s.K + k] += (float)(dt[q] * x[i * s.K + k]);
            }

            for (int k = 0; k < s.K; k++)
            {
                double acc = 0;
                for (int q = 0; q < r; q++) acc += dt[q] * aPool[aOffsets[a] + q * s.K + k];
                dx[i * s.K + k] = (float)(dx[i * s.K + k] + acc);
            }
        }
    }

    /// <summary>y[i, :] *= scales[slot[i], :] for rows with slot &gt;= 0.</summary>
    public static void DoraScale(Span<float> y, ReadOnlySpan<float> scales, ReadOnlySpan<int> rowSlot, int n)
    {
        for (int i = 0; i < rowSlot.Length; i++)
        {
            if (rowSlot[i] < 0) continue;
            for (int c = 0; c < n; c++) y[i * n + c] = (float)((double)y[i * n + c] * scales[rowSlot[i] * n + c]);
        }
    }
}
