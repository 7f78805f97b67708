using ILGPU;
using ILGPU.Algorithms;

namespace PeftSharp.Kernels.Attention;

/// <summary>
/// The exact merge of two partial attention results over disjoint key sets, by their log-sum-exp:
/// m = max(l1, l2), o = (o1 e^(l1 - m) + o2 e^(l2 - m)) / (e^(l1 - m) + e^(l2 - m)), l = m + log(e^(l1 - m) + e^(l2 - m)).
/// A side with l = -infinity (no keys) contributes nothing, exactly. Reference: <see cref="AttentionMergeReference"/>.
/// </summary>
public static class AttentionMergeKernels
{
    /// <summary>One thread per row (a (b, i, h) query row of D values). o and lse may alias o1 and lse1.</summary>
    public static void MergeKernel(
        Index1D row,             // over N rows
        ArrayView<float> o1,     // (N, D)
        ArrayView<float> lse1,   // (N)
        ArrayView<float> o2,     // (N, D)
        ArrayView<float> lse2,   // (N)
        ArrayView<float> o,      // (N, D)
        ArrayView<float> lse,    // (N)
        int d)
    {
        float l1 = lse1[row], l2 = lse2[row];
        int at = row * d;
        if (l2 == float.NegativeInfinity)
        {
            for (int c = 0; c < d; c++) o[at + c] = l1 == float.NegativeInfinity ? 0f : o1[at + c];
            lse[row] = l1;
            return;
        }

        if (l1 == float.NegativeInfinity)
        {
            for (int c = 0; c < d; c++) o[at + c] = o2[at + c];
            lse[row] = l2;
            return;
        }

        float m = XMath.Max(l1, l2);
        float e1 = XMath.Exp(l1 - m), e2 = XMath.Exp(l2 - m);
        float inv = 1f / (e1 + e2);
        for (int c = 0; c < d; c++) o[at + c] = (o1[at + c] * e1 + o2[at + c] * e2) * inv;
        lse[row] = m + XMath.Log(e1 + e2);
    }
}
