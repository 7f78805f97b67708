namespace PeftSharp.Kernels.Attention;

/// <summary>
/// Specification of grouped-query attention: softmax(scale q k^T + mask) v per head, head h reading key/value head
/// h / (H / Hkv), keys outside the causal mask and the sliding window left out. Also returns the log-sum-exp of the scaled scores (natural log), which later merges partial
/// attention results exactly. A query that sees no key has output 0 and lse = -infinity.
/// </summary>
public static class AttentionReference
{
    public static void Forward(
        ReadOnlySpan<float> q, // (B, Tq, H, D)
        ReadOnlySpan<float> k, // (B, Tk, Hkv, D)
        ReadOnlySpan<float> v, // (B, Tk, Hkv, D)
        Span<float> o,         // (B, Tq, H, D)
        Span<float> lse,       // (B, Tq, H)
        AttentionShape s)
    {
        var scores = new double[Math.Max(s.Tk, 1)];
        for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
        for (int i = 0; i < s.Tq; i++)
        {
            int hk = h / s.Group;
            int qi = s.QIndex(b, i, h);
            int first = s.FirstKey(i), n = s.VisibleKeys(i);
            double max = double.NegativeInfinity;
            for (int j = first; j < n; j++)
            {
                int kj = s.KIndex(b, j, hk);
                double dot = 0;
                for (int d = 0; d < s.D; d++) dot += (double)q[qi + d] * k[kj + d];
                scores[j] = dot * s.Scale;
                max = Math.Max(max, scores[j]);
            }

            double sum = 0;
            for (int j = first; j < n; j++) sum += Math.Exp(scores[j] - max);
            lse[s.LseIndex(b, h, i)] = n <= first ? float.NegativeInfinity : (float)(max + Math.Log(sum));
            for (int d = 0; d < s.D; d++)
            {
                double acc = 0;
                for (int j = first; j < n; j++) acc += Math.Exp(scores[j] - max) / sum * v[s.KIndex(b, j, hk) + d];
                o[qi + d] = (float)acc;
            }
        }
    }

    /// <summary>
    /// Gradients of sum(dO * O) with respect to q, k and v, from the forward's lse. dk and dv sum over the H / Hkv
    /// query heads that share each key/value head. Overwrites dq, dk, dv.
    /// </summary>
    public static void Backward(
        ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v, ReadOnlySpan<float> o,
        ReadOnlySpan<float> lse, ReadOnlySpan<float> dO,
        Span<float> dq, Span<float> dk, Span<float> dv, AttentionShape s)
    {
        var dqAcc = new double[dq.Length];
        var dkAcc = new double[dk.Length];
        var dvAcc = new double[dv.Length];
        for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
        for (int i = 0; i < s.Tq; i++)
        {
            int hk = h / s.Group;
            int qi = s.QIndex(b, i, h);
            int n = s.VisibleKeys(i);
            double l = lse[s.LseIndex(b, h, i)];
            double delta = 0;
            for (int d = 0; d < s.D; d++) delta += (double)dO[qi + d] * o[qi + d];
            for (int j = s.FirstKey(i); j < n; j++)
            {
                int kj = s.KIndex(b, j, hk);
                double dot = 0, dp = 0;
                for (int d = 0; d < s.D; d++)
                {
                    dot += (double)q[qi + d] * k[kj + d];
                    dp += (double)dO[qi + d] * v[kj + d];
                }

                double p = Math.Exp(dot * s.Scale - l);
                double ds = p * (dp - delta) * s.Scale;
                for (int d = 0; d < s.D; d++)
                {
                    dqAcc[qi + d] += ds * k[kj + d];
                    dkAcc[kj + d] += ds * q[qi + d];
                    dvAcc[kj + d] += p * dO[qi + d];
                }
            }
        }

        for (int i = 0; i < dq.Length; i++) dq[i] = (float)dqAcc[i];
        for (int i = 0; i < dk.Length; i++) dk[i] = (float)dkAcc[i];
        for (int i = 0; i < dv.Length; i++) dv[i] = (float)dvAcc[i];
    }
}
