using PeftSharp.Data;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>Held-out numbers: mean loss per trained token, perplexity, and exact-match accuracy of greedy completions.</summary>
public sealed record EvalResult(double Loss, double Perplexity, double ExactMatch, int Examples);

public static class Evaluator
{
    public static EvalResult Evaluate(LlamaModel model, IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true, int batchSize = 16)
    {
        var tok = model.Tokenizer;
        double lossSum = 0;
        int counted = 0;
        for (int i = 0; i < examples.Count; i += batchSize)
        {
            var batch = examples.Skip(i).Take(batchSize).ToList();
            var (ids, targets) = Batcher.Encode(batch, tok, seqLen, completionOnly);
            var (l, c) = model.Loss(ids, targets, batch.Count, backward: false);
            lossSum += l * c;
            counted += c;
        }

        int correct = 0;
        foreach (var e in examples)
        {
            string got = Generator.Greedy(model, e.Prompt, maxTokens: tok.EncodeEnd(e.Completion).Length);
            if (got == e.Completion) correct++;
        }

        double loss = counted == 0 ? 0 : lossSum / counted;
        return new EvalResult(loss, Math.Exp(loss), examples.Count == 0 ? 0 : (double)correct / examples.Count, examples.Count);
    }
}

/// <summary>Text generation with a KV cache: the prompt is run once (prefill), then one token per step.</summary>
public static class Generator
{
    public static string Greedy(LlamaModel model, string prompt, int maxTokens) => Sample(model, prompt, maxTokens, temperature: 0f, topK: 0, topP: 1f, seed: 0);

    /// <summary>Samples up to <paramref name="maxTokens"/> tokens after [BOS] prompt, stopping at EOS. Temperature 0 is greedy.</summary>
    public static string Sample(LlamaModel model, string prompt, int maxTokens, float temperature, int topK, float topP, int seed)
    {
        var tok = model.Tokenizer;
        var rng = new Random(seed);
        var seq = tok.EncodeStart(prompt);
        if (seq.Count == 0) throw new ArgumentException($"empty prompt: tokenizer {tok.Name} adds no BOS, so there is nothing to continue from");
        var output = new List<int>();
        int capacity = Math.Min(model.Config.MaxPositionEmbeddings, seq.Count + maxTokens);
        if (seq.Count > capacity) throw new ArgumentException($"prompt of {seq.Count} tokens exceeds max_position_embeddings = {model.Config.MaxPositionEmbeddings}");
        using var cache = new KvCache(model, capacity);
        var last = model.DecodeStep(cache, seq.ToArray());
        for (int i = 0; i < maxTokens; i++)
        {
            int next = temperature <= 0f ? ArgMax(last) : Draw(last, temperature, topK, topP, rng);
            if (next == tok.Eos) break;
            output.Add(next);
            if (cache.Length >= capacity) break;
            last = model.DecodeStep(cache, new[] { next });
        }

        return tok.Decode(output);
    }

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
