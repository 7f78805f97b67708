using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Serving;

/// <summary>One generation request: a prompt, the variant that serves it (null: the base model) and its sampling.</summary>
public sealed record GenerationRequest(string Prompt, string? Variant = null, int MaxTokens = 32, float Temperature = 0f, int TopK = 0, float TopP = 1f, int Seed = 0);

/// <summary>What a request produced: its completion and the number of tokens generated.</summary>
public sealed record GenerationResult(GenerationRequest Request, string Completion, int Tokens);

/// <summary>
/// Continuous batched generation: every live request advances one token per step, all of them in one model step
/// whose rows each carry their own variant (see <see cref="VariantSet"/>). Prompts are prefilled together in the
/// first step. Each request samples from its own seeded generator, so its output does not depend on its neighbours.
/// </summary>
public static class BatchGenerator
{
    public static IReadOnlyList<GenerationResult> Generate(LlamaModel model, IReadOnlyList<GenerationRequest> requests, VariantSet? variants = null)
    {
        if (variants != null && !ReferenceEquals(variants.Model, model)) throw new ArgumentException("the variant set belongs to another model");
        var tok = new ByteTokenizer();
        int n = requests.Count;
        var variantOf = requests.Select(r => variants?.IndexOf(r.Variant) ?? (string.IsNullOrEmpty(r.Variant) || r.Variant == "base"
            ? -1
            : throw new ArgumentException($"request names variant '{r.Variant}' but no variants are loaded"))).ToArray();
        var outputs = requests.Select(_ => new List<int>()).ToArray();
        var rngs = requests.Select(r => new Random(r.Seed)).ToArray();
        var caches = new KvCache?[n];
        try
        {
            var pending = new int[n][];
            for (int i = 0; i < n; i++)
            {
                var r = requests[i];
                if (r.MaxTokens < 0) throw new ArgumentException($"request {i}: max tokens {r.MaxTokens} is negative");
                var seq = new List<int> { ByteTokenizer.Bos };
                seq.AddRange(tok.Encode(r.Prompt));
                int capacity = Math.Min(model.Config.MaxPositionEmbeddings, seq.Count + r.MaxTokens);
                if (seq.Count > capacity) throw new ArgumentException($"request {i}: prompt of {seq.Count} tokens exceeds max_position_embeddings = {model.Config.MaxPositionEmbeddings}");
                caches[i] = new KvCache(model, capacity);
                pending[i] = seq.ToArray();
            }

            var live = Enumerable.Range(0, n).Where(i => requests[i].MaxTokens > 0).ToList();
            while (live.Count > 0)
            {
                var rows = live.SelectMany(i => Enumerable.Repeat(variantOf[i], pending[i].Length)).ToArray();
                float[][] logits;
                using (var bound = variants?.Bind(rows))
                {
                    logits = model.DecodeBatch(live.Select(i => caches[i]!).ToArray(), live.Select(i => pending[i]).ToArray(), bound);
                }

                var next = new List<int>();
                for (int j = 0; j < live.Count; j++)
                {
                    int i = live[j];
                    var r = requests[i];
                    int t = r.Temperature <= 0f ? Generator.ArgMax(logits[j]) : Generator.Draw(logits[j], r.Temperature, r.TopK, r.TopP, rngs[i]);
                    if (t == ByteTokenizer.Eos) continue;
                    outputs[i].Add(t);
                    if (outputs[i].Count >= r.MaxTokens || caches[i]!.Length >= caches[i]!.Capacity) continue;
                    pending[i] = new[] { t };
                    next.Add(i);
                }

                live = next;
            }

            return Enumerable.Range(0, n).Select(i => new GenerationResult(requests[i], tok.Decode(outputs[i]), outputs[i].Count)).ToArray();
        }
        finally
        {
            foreach (var c in caches) c?.Dispose();
        }
    }
}
