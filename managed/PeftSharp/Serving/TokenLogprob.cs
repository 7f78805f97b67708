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
        // The likeliest ids, ties by id, as sampling orders its candidates.
        var best = top > 0 ? Generator.Likeliest(logits, Math.Min(top, logits.Length)) : Array.Empty<int>();
        return new TokenLogprob(token, logits[token] - lse, best.Select(b => (b, logits[b] - lse)).ToArray());
    }
}
