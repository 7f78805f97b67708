namespace PeftSharp.Kernels.Core;

/// <summary>
/// Specification of cross-entropy from logits. Per row: loss = logsumexp(logits) - logits[target]; rows whose
/// target equals the ignore index have loss 0 and gradient 0.
/// </summary>
public static class CrossEntropyReference
{
    public static void Forward(
        ReadOnlySpan<float> logits, // (N, V)
        ReadOnlySpan<int> targets,  // (N)
        Span<float> losses,         // (N)
        int vocab, int ignoreIndex)
    {
        for (int n = 0; n < targets.Length; n++)
        {
            losses[n] = targets[n] == ignoreIndex ? 0f : (float)(LogSumExp(logits.Slice(n * vocab, vocab)) - logits[n * vocab + targets[n]]);
        }
    }

    /// <summary>dlogits = scale * (softmax(logits) - onehot(target)); 0 for ignored rows. Overwrites dlogits.</summary>
    public static void Backward(
        ReadOnlySpan<float> logits, ReadOnlySpan<int> targets, Span<float> dlogits, int vocab, int ignoreIndex, float scale)
    {
        for (int n = 0; n < targets.Length; n++)
        {
            var row = logits.Slice(n * vocab, vocab);
            double lse = LogSumExp(row);
            for (int c = 0; c < vocab; c++)
            {
                dlogits[n * vocab + c] = targets[n] == ignoreIndex
                    ? 0f
                    : (float)(scale * (Math.Exp(row[c] - lse) - (c == targets[n] ? 1.0 : 0.0)));
            }
        }
    }

    public static double LogSumExp(ReadOnlySpan<float> row)
    {
        double max = double.NegativeInfinity;
        foreach (float v in row) max = Math.Max(max, v);
        double sum = 0;
        foreach (float v in row) sum += Math.Exp(v - max);
        return max + Math.Log(sum);
    }
}
