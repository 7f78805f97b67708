namespace PeftSharp.Serving;

/// <summary>
/// A generated token's log probability under the model (log-softmax of its raw logits, before temperature and top-p,
/// as vLLM reports them by default) and the most likely alternatives at that position, most likely first.
/// </summary>
public sealed record TokenLogprob(int Token, double Logprob, IReadOnlyList<(int Token, double Logprob)> Top)
{
    /// <summary>The entry for <paramref name="token"/> drawn from <paramref name="logits"/> (V), with the <paramref name="top"/> likeliest.</summary>
    internal static TokenLogprob Of(float[] logits, int token, int top)
    {
        double lse = PeftSharp.Kernels.Core.CrossEntropyReference.LogSumExp(logits); // in double
        var best = new List<(int Token, double Logprob)>(top + 1);
        if (top > 0)
        {
            // One pass, keeping the top entries sorted: top is small (OpenAI allows up to 20).
            for (int v = 0; v < logits.Length; v++)
            {
                if (best.Count == top && logits[v] <= best[^1].Logprob) continue;
                int at = best.Count;
                while (at > 0 && best[at - 1].Logprob < logits[v]) at--;
                best.Insert(at, (v, logits[v]));
                if (best.Count > top) best.RemoveAt(best.Count - 1);
            }
        }

        return new TokenLogprob(token, logits[token] - lse, best.Select(b => (b.Token, b.Logprob - lse)).ToArray());
    }
}
