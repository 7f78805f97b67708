using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Serving;

/// <summary>
/// One generation request: a prompt, the variant that serves it (null: the base model) and its sampling.
/// <paramref name="SharedPrefix"/>, when given, is text that precedes the prompt and that every request with the same
/// shared prefix and variant reads from one copy of its keys and values.
/// </summary>
public sealed record GenerationRequest(string Prompt, string? Variant = null, int MaxTokens = 32, float Temperature = 0f, int TopK = 0, float TopP = 1f, int Seed = 0, string? SharedPrefix = null);

/// <summary>What a request produced: its completion and the number of tokens generated.</summary>
public sealed record GenerationResult(GenerationRequest Request, string Completion, int Tokens);

/// <summary>Which shared prefixes a batch uses: only those requests name (Told), those plus common token prefixes it finds (Auto), or none.</summary>
public enum PrefixSharing
{
    Off,
    Told,
    Auto,
}

/// <summary>How a batch shared prefixes: distinct prefixes computed once, the sequences reading them, and the prefix tokens not recomputed.</summary>
public sealed record SharingReport(int Prefixes, int SharingSequences, long TokensSaved);

/// <summary>
/// Continuous batched generation: every live request advances one token per step, all of them in one model step
/// whose rows each carry their own variant (see <see cref="VariantSet"/>). Prompts are prefilled together in the
/// first step. Requests of one variant that start with the same tokens share one KV cache of that prefix (computed
/// once, read by all of them through the shared-prefix attention path, freed when the last of them finishes).
/// Each request samples from its own seeded generator, so its output does not depend on its neighbours.
/// </summary>
public static class BatchGenerator
{
    /// <summary>Shortest common token prefix worth sharing when found rather than told.</summary>
    public const int MinDetectedPrefix = 4;

    public static IReadOnlyList<GenerationResult> Generate(LlamaModel model, IReadOnlyList<GenerationRequest> requests, VariantSet? variants = null, PrefixSharing sharing = PrefixSharing.Auto) =>
        GenerateWithReport(model, requests, variants, sharing).Results;

    public static (IReadOnlyList<GenerationResult> Results, SharingReport Sharing) GenerateWithReport(
        LlamaModel model, IReadOnlyList<GenerationRequest> requests, VariantSet? variants = null, PrefixSharing sharing = PrefixSharing.Auto)
    {
        if (variants != null && !ReferenceEquals(variants.Model, model)) throw new ArgumentException("the variant set belongs to another model");
        var tok = new ByteTokenizer();
        int n = requests.Count;
        var variantOf = requests.Select(r => variants?.IndexOf(r.Variant) ?? (string.IsNullOrEmpty(r.Variant) || r.Variant == "base"
            ? -1
            : throw new ArgumentException($"request names variant '{r.Variant}' but no variants are loaded"))).ToArray();
        var full = new int[n][];
        for (int i = 0; i < n; i++)
        {
            var r = requests[i];
            if (r.MaxTokens < 0) throw new ArgumentException($"request {i}: max tokens {r.MaxTokens} is negative");
            full[i] = new[] { ByteTokenizer.Bos }.Concat(tok.Encode((r.SharedPrefix ?? "") + r.Prompt)).ToArray();
            if (full[i].Length > model.Config.MaxPositionEmbeddings) throw new ArgumentException($"request {i}: prompt of {full[i].Length} tokens exceeds max_position_embeddings = {model.Config.MaxPositionEmbeddings}");
        }

        var prefixLength = PlanPrefixes(requests, variantOf, full, sharing, tok);
        var outputs = requests.Select(_ => new List<int>()).ToArray();
        var rngs = requests.Select(r => new Random(r.Seed)).ToArray();
        var caches = new KvCache?[n];
        var prefixOf = new KvCache?[n];
        var users = new Dictionary<KvCache, int>();
        try
        {
            // Distinct prefixes (variant, tokens), each computed once in one batched step.
            var distinct = Enumerable.Range(0, n).Where(i => prefixLength[i] > 0)
                .GroupBy(i => (variantOf[i], string.Join(",", full[i].Take(prefixLength[i])))).ToList();
            var made = new List<(KvCache Cache, int[] Tokens, int Variant)>();
            foreach (var g in distinct)
            {
                int first = g.First();
                var cache = new KvCache(model, prefixLength[first]);
                made.Add((cache, full[first][..prefixLength[first]], variantOf[first]));
                foreach (int i in g) prefixOf[i] = cache;
                users[cache] = g.Count();
            }

            if (made.Count > 0)
            {
                using var bound = variants?.Bind(made.SelectMany(m => Enumerable.Repeat(m.Variant, m.Tokens.Length)).ToArray());
                model.DecodeBatch(made.Select(m => m.Cache).ToArray(), made.Select(m => m.Tokens).ToArray(), bound);
            }

            var pending = new int[n][];
            for (int i = 0; i < n; i++)
            {
                int p = prefixLength[i];
                int capacity = Math.Min(model.Config.MaxPositionEmbeddings - p, full[i].Length - p + requests[i].MaxTokens);
                caches[i] = new KvCache(model, capacity);
                pending[i] = full[i][p..];
            }

            // Sequences reading one prefix sit side by side, so their rows form one matrix against it.
            var live = Enumerable.Range(0, n).Where(i => requests[i].MaxTokens > 0).OrderBy(i => prefixOf[i] == null ? -1 : made.FindIndex(m => m.Cache == prefixOf[i])).ToList();
            foreach (int i in Enumerable.Range(0, n).Where(i => requests[i].MaxTokens <= 0)) Release(prefixOf[i], users);
            while (live.Count > 0)
            {
                var rows = live.SelectMany(i => Enumerable.Repeat(variantOf[i], pending[i].Length)).ToArray();
                float[][] logits;
                using (var bound = variants?.Bind(rows))
                {
                    logits = model.DecodeBatch(live.Select(i => caches[i]!).ToArray(), live.Select(i => pending[i]).ToArray(), bound, live.Select(i => prefixOf[i]).ToArray());
                }

                var next = new List<int>();
                for (int j = 0; j < live.Count; j++)
                {
                    int i = live[j];
                    var r = requests[i];
                    int t = r.Temperature <= 0f ? Generator.ArgMax(logits[j]) : Generator.Draw(logits[j], r.Temperature, r.TopK, r.TopP, rngs[i]);
                    bool done = t == ByteTokenizer.Eos;
                    if (!done) outputs[i].Add(t);
                    done |= outputs[i].Count >= r.MaxTokens || caches[i]!.Length >= caches[i]!.Capacity;
                    if (done)
                    {
                        Release(prefixOf[i], users);
                        continue;
                    }

                    pending[i] = new[] { t };
                    next.Add(i);
                }

                live = next;
            }

            var results = Enumerable.Range(0, n).Select(i => new GenerationResult(requests[i], tok.Decode(outputs[i]), outputs[i].Count)).ToArray();
            var report = new SharingReport(made.Count, prefixLength.Count(p => p > 0), distinct.Sum(g => (long)(g.Count() - 1) * prefixLength[g.First()]));
            return (results, report);
        }
        finally
        {
            foreach (var c in caches) c?.Dispose();
            foreach (var c in users.Keys) c.Dispose(); // idempotent for prefixes already released
        }
    }

    /// <summary>A shared prefix's last reader is done: its keys and values are freed.</summary>
    private static void Release(KvCache? prefix, Dictionary<KvCache, int> users)
    {
        if (prefix == null) return;
        if (--users[prefix] == 0) prefix.Dispose();
    }

    /// <summary>
    /// How many leading tokens of each request come from a shared prefix: the told prefix ([BOS] + SharedPrefix)
    /// where two or more requests of a variant give the same one; with Auto, also the longest common token prefix of
    /// the remaining requests of each variant when it is at least <see cref="MinDetectedPrefix"/> long. Every request
    /// keeps at least one prompt token of its own.
    /// </summary>
    private static int[] PlanPrefixes(IReadOnlyList<GenerationRequest> requests, int[] variantOf, int[][] full, PrefixSharing sharing, ByteTokenizer tok)
    {
        int n = requests.Count;
        var length = new int[n];
        if (sharing == PrefixSharing.Off) return length;
        foreach (var g in Enumerable.Range(0, n).Where(i => requests[i].SharedPrefix != null).GroupBy(i => (variantOf[i], requests[i].SharedPrefix)))
        {
            if (g.Count() < 2) continue;
            int p = 1 + tok.Encode(g.Key.SharedPrefix!).Length;
            foreach (int i in g) length[i] = Math.Min(p, full[i].Length - 1);
        }

        if (sharing == PrefixSharing.Auto)
        {
            foreach (var g in Enumerable.Range(0, n).Where(i => length[i] == 0 && requests[i].MaxTokens > 0).GroupBy(i => variantOf[i]))
            {
                var members = g.ToList();
                if (members.Count < 2) continue;
                int lcp = members.Min(i => full[i].Length - 1);
                foreach (int i in members.Skip(1))
                {
                    int k = 0;
                    while (k < lcp && full[i][k] == full[members[0]][k]) k++;
                    lcp = k;
                }

                if (lcp >= MinDetectedPrefix)
                {
                    foreach (int i in members) length[i] = lcp;
                }
            }
        }

        // Prefixes must agree within a group (the told ones may have been capped differently): share the shortest.
        foreach (var g in Enumerable.Range(0, n).Where(i => length[i] > 0).GroupBy(i => (variantOf[i], requests[i].SharedPrefix ?? "")))
        {
            int p = g.Min(i => length[i]);
            foreach (int i in g) length[i] = p;
        }

        return length;
    }
}
