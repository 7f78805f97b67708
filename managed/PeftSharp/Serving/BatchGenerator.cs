using PeftSharp.Data;
using PeftSharp.Model;

namespace PeftSharp.Serving;

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

    /// <summary>
    /// Generates every request in one batch. Safe from several threads: generations over one model take turns (the
    /// model's <see cref="LlamaModel.GenerationLock"/>); put concurrent requests in one call to serve them together.
    /// </summary>
    public static (IReadOnlyList<GenerationResult> Results, SharingReport Sharing) GenerateWithReport(
        LlamaModel model, IReadOnlyList<GenerationRequest> requests, VariantSet? variants = null, PrefixSharing sharing = PrefixSharing.Auto)
    {
        lock (model.GenerationLock)
        {
            return GenerateLocked(model, requests, variants, sharing);
        }
    }

    private static (IReadOnlyList<GenerationResult> Results, SharingReport Sharing) GenerateLocked(
        LlamaModel model, IReadOnlyList<GenerationRequest> requests, VariantSet? variants, PrefixSharing sharing)
    {
        if (variants != null && !ReferenceEquals(variants.Model, model)) throw new ArgumentException("the variant set belongs to another model");
        var tok = model.Tokenizer;
        var stops = model.StopTokens.ToHashSet();
        int n = requests.Count;
        if (requests.FirstOrDefault(r => r.TopLogprobs != null) is { } asked)
        {
            throw new NotSupportedException($"request {requests.ToList().IndexOf(asked)}: log probabilities come from VariantServer (peft serve), not the closed batch");
        }

        var variantOf = requests.Select(r => variants?.IndexOf(r.Variant) ?? (string.IsNullOrEmpty(r.Variant) || r.Variant == "base"
            ? -1
            : throw new ArgumentException($"request names variant '{r.Variant}' but no variants are loaded"))).ToArray();
        var full = new int[n][];
        var levelEnds = new int[n][]; // token count through each told level ([BOS] included in the first)
        for (int i = 0; i < n; i++)
        {
            var r = requests[i];
            (full[i], levelEnds[i]) = Tokenize(model, r, $"request {i}");
        }

        // An activated LoRA adapts its rows only from its invocation tokens on: its earlier positions are the base's,
        // shared with base requests (shareOf -1) and never past that start.
        var activeFrom = new int[n];
        for (int i = 0; i < n; i++)
        {
            if (variantOf[i] < 0) continue;
            activeFrom[i] = variants!.RequireActivation(variantOf[i], full[i], $"request {i}");
        }

        var shareOf = Enumerable.Range(0, n).Select(i => activeFrom[i] > 0 ? -1 : variantOf[i]).ToArray();
        var chainEnds = PlanPrefixes(requests, shareOf, full, levelEnds, sharing, model.Config.AttentionWindow);
        for (int i = 0; i < n; i++)
        {
            if (activeFrom[i] > 0) chainEnds[i] = chainEnds[i].Where(e => e <= activeFrom[i]).ToArray();
        }

        var outputs = requests.Select(_ => new List<int>()).ToArray();
        var rngs = requests.Select(r => new Random(r.Seed)).ToArray();
        var stopped = new bool[n];
        var caches = new KvCache?[n];
        var users = new Dictionary<KvCache, int>();
        var nodes = new List<(KvCache Cache, int[] Tokens, int Variant, int Depth)>();
        var chainOf = Enumerable.Range(0, n).Select(_ => new List<KvCache>()).ToArray();
        long cachedPositions = 0;
        KvCache NewCache(int positions, KvCache? parent)
        {
            // The batch's caches together, checked before each is allocated: a batch that could never fit is refused
            // with its figure instead of exhausting the device part way through.
            cachedPositions += positions;
            ModelMemory.EnsureFits(model.Device, ModelMemory.KvCacheBytes(model.Config, cachedPositions), $"the KV caches of {n} requests ({cachedPositions} positions so far)");
            return new KvCache(model, positions, parent);
        }

        try
        {
            // The prefix tree: one node per distinct (variant, tokens through that level), computed level by level
            // (each level's nodes in one batched step, reading their parents), each holding its own level's tokens.
            var byKey = new Dictionary<string, KvCache>();
            int depth = chainEnds.Max(e => e.Length);
            for (int level = 0; level < depth; level++)
            {
                var fresh = new List<(KvCache Cache, int[] Tokens, int Variant)>();
                for (int i = 0; i < n; i++)
                {
                    if (level >= chainEnds[i].Length) continue;
                    int from = level == 0 ? 0 : chainEnds[i][level - 1], to = chainEnds[i][level];
                    string key = PrefixKey(shareOf[i], full[i], to);
                    if (!byKey.TryGetValue(key, out var cache))
                    {
                        var parent = level == 0 ? variants?.PrefixOf(variantOf[i]) : chainOf[i][level - 1];
                        cache = NewCache(to - from, parent);
                        byKey[key] = cache;
                        fresh.Add((cache, full[i][from..to], shareOf[i]));
                        nodes.Add((cache, full[i][from..to], shareOf[i], level));
                        users[cache] = 0;
                        if (parent != null && users.ContainsKey(parent)) users[parent]++;
                    }

                    chainOf[i].Add(cache);
                }

                if (fresh.Count > 0)
                {
                    using var bound = variants?.Bind(fresh.SelectMany(m => Enumerable.Repeat(m.Variant, m.Tokens.Length)).ToArray(), activationResolved: true);
                    model.DecodeBatch(fresh.Select(m => m.Cache).ToArray(), fresh.Select(m => m.Tokens).ToArray(), bound);
                }
            }

            var pending = new int[n][];
            var position = new int[n]; // of pending[i][0]
            for (int i = 0; i < n; i++)
            {
                int p = chainEnds[i].Length == 0 ? 0 : chainEnds[i][^1];
                position[i] = p;
                var parent = chainOf[i].Count == 0 ? variants?.PrefixOf(variantOf[i]) : chainOf[i][^1];
                if (parent != null && users.ContainsKey(parent)) users[parent]++;
                int capacity = Math.Min(model.Config.ContextLimit - p, full[i].Length - p + requests[i].MaxTokens);
                caches[i] = NewCache(capacity, parent);
                pending[i] = full[i][p..];
            }

            // Sequences under one prefix sit side by side at every level, so their rows form one matrix against it.
            var live = Enumerable.Range(0, n).Where(i => requests[i].MaxTokens > 0).OrderBy(i => variants?.PrefixOf(variantOf[i]) == null ? -1 : variantOf[i])
                .ThenBy(i => string.Join(",", chainOf[i].Select(c => nodes.FindIndex(m => m.Cache == c).ToString("D6")))).ThenBy(i => i).ToList();
            foreach (int i in Enumerable.Range(0, n).Where(i => requests[i].MaxTokens <= 0)) Release(caches[i]!.Parent, users);
            while (live.Count > 0)
            {
                var rows = live.SelectMany(i => VariantSet.ActivatedRows(variantOf[i], activeFrom[i], position[i], pending[i].Length)).ToArray();
                float[][] logits;
                using (var bound = variants?.Bind(rows, activationResolved: true))
                {
                    logits = model.DecodeBatch(live.Select(i => caches[i]!).ToArray(), live.Select(i => pending[i]).ToArray(), bound);
                }

                foreach (int i in live) position[i] += pending[i].Length;

                var next = new List<int>();
                for (int j = 0; j < live.Count; j++)
                {
                    int i = live[j];
                    var r = requests[i];
                    int t = Generator.Next(r, logits[j], rngs[i]);
                    bool done = t == tok.Eos || stops.Contains(t);
                    if (!done) outputs[i].Add(t);
                    done |= stopped[i] = done || (r.Stop.Count > 0 && StopText.Find(tok.Decode(outputs[i]), r.Stop) >= 0);
                    done |= outputs[i].Count >= r.MaxTokens || caches[i]!.Length >= caches[i]!.Capacity;
                    if (done)
                    {
                        Release(caches[i]!.Parent, users);
                        continue;
                    }

                    pending[i] = new[] { t };
                    next.Add(i);
                }

                live = next;
            }

            var results = Enumerable.Range(0, n).Select(i => Result(requests[i], tok.Decode(outputs[i]), outputs[i].Count, full[i].Length, stopped[i])).ToArray();
            long saved = nodes.Sum(m => (long)(Enumerable.Range(0, n).Count(i => chainOf[i].Contains(m.Cache)) - 1) * m.Tokens.Length);
            var report = new SharingReport(nodes.Count, Enumerable.Range(0, n).Count(i => chainOf[i].Count > 0), saved);
            return (results, report);
        }
        finally
        {
            foreach (var c in caches) c?.Dispose();
            foreach (var c in users.Keys) c.Dispose(); // idempotent for prefixes already released
        }
    }

    /// <summary>[BOS], the told prefix levels and the prompt as tokens, with the token count through each level; checked against the context.</summary>
    internal static (int[] Tokens, int[] LevelEnds) Tokenize(LlamaModel model, GenerationRequest r, string what)
    {
        var tok = model.Tokenizer;
        if (r.MaxTokens < 0) throw new ArgumentException($"{what}: max tokens {r.MaxTokens} is negative");
        if (r.PromptTokens is { } ids)
        {
            if (r.Prompt.Length > 0 || r.PrefixLevels.Count > 0) throw new ArgumentException($"{what}: give the prompt as text or as token ids, not both");
            if (ids.Count == 0) throw new ArgumentException($"{what}: the prompt's token ids are empty");
            int vocab = model.Config.VocabSize;
            for (int at = 0; at < ids.Count; at++)
            {
                if (ids[at] < 0 || ids[at] >= vocab) throw new ArgumentException($"{what}: prompt token {at} is {ids[at]}, outside the vocabulary [0, {vocab})");
            }

            if (ids.Count > model.Config.ContextLimit) throw new ArgumentException($"{what}: prompt of {ids.Count} tokens exceeds {model.Config.ContextLimitText}");
            return (ids.ToArray(), Array.Empty<int>());
        }

        var tokens = r.AddBos ? tok.EncodeStart("") : new List<int>();
        var ends = new List<int>();
        foreach (var level in r.PrefixLevels)
        {
            tokens.AddRange(tok.Encode(level));
            ends.Add(tokens.Count);
        }

        tokens.AddRange(tok.Encode(r.Prompt));
        if (tokens.Count == 0) throw new ArgumentException($"{what}: empty prompt, and tokenizer {tok.Name} adds no BOS to continue from");
        if (tokens.Count > model.Config.ContextLimit) throw new ArgumentException($"{what}: prompt of {tokens.Count} tokens exceeds {model.Config.ContextLimitText}");
        return (tokens.ToArray(), ends.ToArray());
    }

    /// <summary>
    /// Why a request for an activated LoRA whose prompt lacks the invocation tokens is refused: PEFT would answer it
    /// with the base model alone, which a caller naming the adapter would not expect.
    /// </summary>
    internal static string NoInvocation(string what, string variant, IReadOnlyList<int> invocation) =>
        $"{what}: variant '{variant}' is an activated LoRA and the prompt does not contain its invocation tokens [{string.Join(", ", invocation)}]; PEFT would run " +
        "the base model alone for it; end the prompt with the invocation sequence, or ask for the base";

    /// <summary>A finished request's result: the completion cut before its first stop text, with its counts.</summary>
    internal static GenerationResult Result(GenerationRequest request, string text, int tokens, int promptTokens, bool stopped, int cachedTokens = 0)
    {
        int at = StopText.Find(text, request.Stop);
        return new GenerationResult(request, at >= 0 ? text[..at] : text, tokens)
        {
            PromptTokens = promptTokens,
            CachedPromptTokens = cachedTokens,
            FinishReason = stopped || at >= 0 ? "stop" : "length",
        };
    }

    /// <summary>Identifies a prefix: the variant that computes it and its tokens (through <paramref name="to"/>).</summary>
    private static string PrefixKey(int variant, int[] tokens, int to) => variant + ":" + string.Join(",", tokens.Take(to));

    /// <summary>A reader of a shared prefix is done: the last reader frees it, and then its own parent loses a reader.</summary>
    private static void Release(KvCache? prefix, Dictionary<KvCache, int> users)
    {
        while (prefix != null && users.ContainsKey(prefix) && --users[prefix] == 0) // variant prefixes belong to the VariantSet
        {
            prefix.Dispose();
            prefix = prefix.Parent;
        }
    }

    /// <summary>
    /// Where each request's shared prefix levels end (token counts, root first). Told levels: a level is shared when
    /// two or more requests of a variant give the same levels up to it. With Auto, requests with no told level that
    /// share a variant also share their longest common token prefix when it is at least
    /// <see cref="MinDetectedPrefix"/> long. Every request keeps at least one prompt token of its own. Under a sliding
    /// window a request that can run past the window shares nothing (a shared prefix would have to leave its window).
    /// </summary>
    private static int[][] PlanPrefixes(IReadOnlyList<GenerationRequest> requests, int[] variantOf, int[][] full, int[][] levelEnds, PrefixSharing sharing, int window)
    {
        int n = requests.Count;
        var chains = Enumerable.Range(0, n).Select(_ => Array.Empty<int>()).ToArray();
        if (sharing == PrefixSharing.Off) return chains;
        // How many requests give each (level, variant, tokens through that level): one pass, not a scan per request.
        var sharersOf = new Dictionary<string, int>();
        for (int i = 0; i < n; i++)
        {
            for (int level = 0; level < levelEnds[i].Length; level++)
            {
                string key = level + "|" + PrefixKey(variantOf[i], full[i], levelEnds[i][level]);
                sharersOf[key] = sharersOf.GetValueOrDefault(key) + 1;
            }
        }

        for (int i = 0; i < n; i++)
        {
            var ends = new List<int>();
            for (int level = 0; level < levelEnds[i].Length; level++)
            {
                int to = levelEnds[i][level];
                int sharers = sharersOf[level + "|" + PrefixKey(variantOf[i], full[i], to)];
                if (sharers < 2 || to >= full[i].Length) break; // unshared, or nothing of its own would be left
                ends.Add(to);
            }

            chains[i] = ends.ToArray();
        }

        if (sharing == PrefixSharing.Auto)
        {
            foreach (var g in Enumerable.Range(0, n).Where(i => requests[i].PrefixLevels.Count == 0 && requests[i].MaxTokens > 0).GroupBy(i => variantOf[i]))
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
                    foreach (int i in members) chains[i] = new[] { lcp };
                }
            }
        }

        if (window > 0)
        {
            for (int i = 0; i < n; i++)
            {
                if (full[i].Length + requests[i].MaxTokens > window) chains[i] = Array.Empty<int>();
            }
        }

        return chains;
    }
}
