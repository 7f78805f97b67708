using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Attention;

/// <summary>
/// Grouped-query attention with an online softmax: no Tq x Tk matrix is ever stored. One thread per query row
/// (forward, dq) or per key row (dk, dv), so no two threads write the same element: no atomics (PoCL cannot build
/// them) and a fixed summation order. Reference: <see cref="AttentionReference"/>.
/// </summary>
public static class AttentionKernels
{
    /// <summary>Forward, one thread per (b, i, h). o accumulates in place and is rescaled as the max grows.</summary>
    public static void ForwardKernel(
        Index1D index,          // over B * Tq * H, ordered (b, i, h): the row of o and of lse
        ArrayView<float> q,     // (B, Tq, H, D)
        ArrayView<float> k,     // (B, Tk, Hkv, D)
        ArrayView<float> v,     // (B, Tk, Hkv, D)
        ArrayView<float> o,     // (B, Tq, H, D)
        ArrayView<float> lse,   // (B, Tq, H)
        AttentionShape s)
    {
        int h = index % s.H;
        int bi = index / s.H;
        int i = bi % s.Tq;
        int b = bi / s.Tq;
        int hk = h / s.Group;
        int qi = s.QIndex(b, i, h);
        int first = s.FirstKey(i), n = s.VisibleKeys(i);
        for (int d = 0; d < s.D; d++) o[qi + d] = 0f;
        float max = float.NegativeInfinity;
        float sum = 0f;
        for (int j = first; j < n; j++)
        {
            int kj = s.KIndex(b, j, hk);
            float dot = 0f;
            for (int d = 0; d < s.D; d++) dot += q[qi + d] * k[kj + d];
            float score = dot * s.Scale;
            float newMax = XMath.Max(max, score);
            float correction = XMath.Exp(max - newMax); // exp(-inf) = 0 on the first key
            float p = XMath.Exp(score - newMax);
            sum = sum * correction + p;
            for (int d = 0; d < s.D; d++) o[qi + d] = o[qi + d] * correction + p * v[kj + d];
            max = newMax;
        }

        if (n <= first)
        {
            lse[index] = float.NegativeInfinity;
            return;
        }

        float inv = 1f / sum;
        for (int d = 0; d < s.D; d++) o[qi + d] *= inv;
        lse[index] = max + XMath.Log(sum);
    }

    /// <summary>delta[b, i, h] = sum_d dO * O, the softmax backward's row term. One thread per (b, i, h).</summary>
    public static void DeltaKernel(
        Index1D index,          // over B * Tq * H
        ArrayView<float> o,     // (B, Tq, H, D)
        ArrayView<float> dO,    // (B, Tq, H, D)
        ArrayView<float> delta, // (B, Tq, H)
        AttentionShape s)
    {
        int qi = index * s.D; // rows of o are (b, i, h) in the same order
        float acc = 0f;
        for (int d = 0; d < s.D; d++) acc += dO[qi + d] * o[qi + d];
        delta[index] = acc;
    }

    /// <summary>dq, one thread per (b, i, h), probabilities recomputed from lse.</summary>
    public static void BackwardQueryKernel(
        Index1D index,          // over B * Tq * H
        ArrayView<float> q,     // (B, Tq, H, D)
        ArrayView<float> k,     // (B, Tk, Hkv, D)
        ArrayView<float> v,     // (B, Tk, Hkv, D)
        ArrayView<float> lse,   // (B, Tq, H)
        ArrayView<float> delta, // (B, Tq, H)
        ArrayView<float> dO,    // (B, Tq, H, D)
        ArrayView<float> dq,    // (B, Tq, H, D)
        AttentionShape s)
    {
        int h = index % s.H;
        int bi = index / s.H;
        int i = bi % s.Tq;
        int b = bi / s.Tq;
        int hk = h / s.Group;
        int qi = s.QIndex(b, i, h);
        int n = s.VisibleKeys(i);
        float l = lse[index];
        float dl = delta[index];
        for (int d = 0; d < s.D; d++) dq[qi + d] = 0f;
        for (int j = s.FirstKey(i); j < n; j++)
        {
            int kj = s.KIndex(b, j, hk);
            float dot = 0f, dp = 0f;
            for (int d = 0; d < s.D; d++)
            {
                dot += q[qi + d] * k[kj + d];
                dp += dO[qi + d] * v[kj + d];
            }

            float ds = XMath.Exp(dot * s.Scale - l) * (dp - dl) * s.Scale;
            for (int d = 0; d < s.D; d++) dq[qi + d] += ds * k[kj + d];
        }
    }

    /// <summary>dk and dv, one thread per (b, j, hk), summing over the group's query heads and the queries that see j.</summary>
    public static void BackwardKeyValueKernel(
        Index1D index,          // over B * Tk * Hkv, ordered (b, j, hk)
        ArrayView<float> q,     // (B, Tq, H, D)
        ArrayView<float> k,     // (B, Tk, Hkv, D)
        ArrayView<float> v,     // (B, Tk, Hkv, D)
        ArrayView<float> lse,   // (B, Tq, H)
        ArrayView<float> delta, // (B, Tq, H)
        ArrayView<float> dO,    // (B, Tq, H, D)
        ArrayView<float> dk,    // (B, Tk, Hkv, D)
        ArrayView<float> dv,    // (B, Tk, Hkv, D)
        AttentionShape s)
    {
        int hk = index % s.Hkv;
        int bj = index / s.Hkv;
        int j = bj % s.Tk;
        int b = bj / s.Tk;
        int kj = index * s.D;
        for (int d = 0; d < s.D; d++)
        {
            dk[kj + d] = 0f;
            dv[kj + d] = 0f;
        }

        int first = s.FirstQuery(j), end = s.EndQuery(j);
        for (int g = 0; g < s.Group; g++)
        {
            int h = hk * s.Group + g;
            for (int i = first; i < end; i++)
            {
                int qi = s.QIndex(b, i, h);
                int li = s.LseIndex(b, h, i);
                float dot = 0f, dp = 0f;
                for (int d = 0; d < s.D; d++)
                {
                    dot += q[qi + d] * k[kj + d];
                    dp += dO[qi + d] * v[kj + d];
                }

                float p = XMath.Exp(dot * s.Scale - lse[li]);
                float ds = p * (dp - delta[li]) * s.Scale;
                for (int d = 0; d < s.D; d++)
                {
                    dk[kj + d] += ds * q[qi + d];
                    dv[kj + d] += p * dO[qi + d];
                }
            }
        }
    }
}
