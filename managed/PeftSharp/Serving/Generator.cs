using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>Generation from one prompt, and the sampling every request uses (greedy, temperature, top-k, top-p).</summary>
public static class Generator
{
    public static string Greedy(LlamaModel model, string prompt, int maxTokens) => Sample(model, prompt, maxTokens, temperature: 0f, topK: 0, topP: 1f, seed: 0);

    /// <summary>
    /// Samples up to <paramref name="maxTokens"/> tokens after [BOS] prompt, stopping at EOS (temperature 0 is greedy):
    /// one request through <see cref="BatchGenerator"/>, the path every batch of requests takes.
    /// </summary>
    public static string Sample(LlamaModel model, string prompt, int maxTokens, float temperature, int topK, float topP, int seed) =>
        BatchGenerator.Generate(model, new[] { new GenerationRequest(prompt, null, maxTokens, temperature, topK, topP, seed) }, sharing: PrefixSharing.Off)[0].Completion;

    /// <summary>The request's next token from <paramref name="logits"/>: greedy at temperature 0, else drawn with its sampling.</summary>
    internal static int Next(GenerationRequest r, float[] logits, Random rng) =>
        r.Temperature <= 0f ? ArgMax(logits) : Draw(logits, r.Temperature, r.TopK, r.TopP, rng);

    internal static int ArgMax(float[] v)
    {
        int best = 0;
        for (int i = 1; i < v.Length; i++)
        {
            if (v[i] > v[best]) best = i;
        }

        return best;
    }

    internal static int Draw(float[] logits, float temperature, int topK, float topP, Random rng)
    {
        var order = Enumerable.Range(0, logits.Length).OrderByDescending(i => logits[i]).ToList();
        if (topK > 0) order = order.Take(topK).ToList();
        double max = logits[order[0]];
        var probs = order.Select(i => Math.Exp((logits[i] - max) / temperature)).ToList();
        double total = probs.Sum();
        if (topP < 1f)
        {
            double cum = 0;
            int keep = 0;
            while (keep < probs.Count && cum < topP * total)
            {
                cum += probs[keep];
                keep++;
            }

            order = order.Take(Math.Max(1, keep)).ToList();
            probs = probs.Take(order.Count).ToList();
            total = probs.Sum();
        }

        double r = rng.NextDouble() * total;
        for (int i = 0; i < order.Count; i++)
        {
            r -= probs[i];
            if (r <= 0) return order[i];
        }

        return order[^1];
    }
}
