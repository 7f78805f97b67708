namespace PeftSharp.Kernels.Attention;

/// <summary>Specification of <see cref="AttentionMergeKernels.MergeKernel"/>, in double.</summary>
public static class AttentionMergeReference
{
    public static void Merge(
        ReadOnlySpan<float> o1, ReadOnlySpan<float> lse1, // (N, D), (N)
        ReadOnlySpan<float> o2, ReadOnlySpan<float> lse2, // (N, D), (N)
        Span<float> o, Span<float> lse, int d)            // (N, D), (N)
    {
        for (int r = 0; r < lse1.Length; r++)
        {
            double l1 = lse1[r], l2 = lse2[r];
            double m = Math.Max(l1, l2);
            if (double.IsNegativeInfinity(m))
            {
                for (int c = 0; c < d; c++) o[r * d + c] = 0f;
                lse[r] = float.NegativeInfinity;
                continue;
            }

            double e1 = double.IsNegativeInfinity(l1) ? 0 : Math.Exp(l1 - m), e2 = double.IsNegativeInfinity(l2) ? 0 : Math.Exp(l2 - m);
            for (int c = 0; c < d; c++)
            {
                double a = e1 == 0 ? 0 : o1[r * d + c] * e1, b = e2 == 0 ? 0 : o2[r * d + c] * e2;
                o[r * d + c] = (float)((a + b) / (e1 + e2));
            }

            lse[r] = (float)(m + Math.Log(e1 + e2));
        }
    }
}
