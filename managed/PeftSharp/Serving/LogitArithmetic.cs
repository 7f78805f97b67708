using System.Runtime.CompilerServices;
using PeftSharp.Data;
using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>
/// One model's share of a combined next-token score: <see cref="Weight"/> times the logits of <see cref="Model"/>
/// served as <see cref="Variant"/> of <see cref="Variants"/> (null: the model itself).
/// </summary>
public sealed record LogitTerm(LlamaModel Model, float Weight, string? Variant = null, VariantSet? Variants = null);

/// <summary>
/// Decoding from a weighted sum of several models' logits, every request advancing one token a step. The terms on
/// one model run as rows of one mixed batch over its shared weights (a base row and a variant row of each request,
/// side by side), each row with its own KV cache; terms on other models run as their own batches in the same step.
/// Two uses from the seeds' papers: contrastive generation between a base and its fine-tune, and proxy-tuning.
/// </summary>
public static class LogitArithmetic
{
    /// <summary>
    /// Contrastive generation of a fine-tune against its base: (1 + alpha) l_fine - alpha l_base, i.e. the fine-tune's
    /// logits moved alpha further along the change fine-tuning made (alpha 0 is the fine-tune alone). Both rows of
    /// each request in one mixed batch of <paramref name="variants"/>.
    /// </summary>
    public static IReadOnlyList<LogitTerm> Contrastive(VariantSet variants, string fine, float alpha) =>
        new[] { new LogitTerm(variants.Model, 1f + alpha, fine, variants), new LogitTerm(variants.Model, -alpha, null, variants) };

    /// <summary>
    /// Proxy-tuning (Liu et al., 2024): a large untuned model steered by a small tuned/untuned pair, l_large +
    /// alpha (l_expert - l_anti-expert). The expert is variant <paramref name="expert"/> of <paramref name="smallVariants"/>
    /// (a LoRA or delta of the small model, both rows in one mixed batch), or else the separate model
    /// <paramref name="expertModel"/>; the anti-expert is the small model itself.
    /// </summary>
    public static IReadOnlyList<LogitTerm> ProxyTuning(LlamaModel large, LlamaModel small, float alpha = 1f, VariantSet? smallVariants = null, string? expert = null,
        LlamaModel? expertModel = null)
    {
        if ((expert == null) == (expertModel == null)) throw new ArgumentException("proxy-tuning: give the expert as a variant of the small model or as a model of its own, not both or neither");
        if (expert != null && smallVariants == null) throw new ArgumentException($"proxy-tuning: expert variant '{expert}' needs the small model's variant set");
        if (smallVariants != null && !ReferenceEquals(smallVariants.Model, small)) throw new ArgumentException("proxy-tuning: the variant set belongs to another model than the small one");
        var expertTerm = expert != null ? new LogitTerm(small, alpha, expert, smallVariants) : new LogitTerm(expertModel!, alpha);
        return new[] { new LogitTerm(large, 1f), expertTerm, new LogitTerm(small, -alpha, null, smallVariants) };
    }

    /// <summary>
    /// Generates every request from the weighted sum of the terms' logits (summed in double), sampled as
    /// <see cref="BatchGenerator"/> samples (greedy at temperature 0, else the request's own seeded draw), stopping at
    /// the first term's model's EOS and stop tokens. Every model must read each prompt as the same tokens over the
    /// same vocabulary; requests name no variant and no shared prefix (the terms choose the variants).
    /// </summary>
    public static IReadOnlyList<GenerationResult> Generate(IReadOnlyList<LogitTerm> terms, IReadOnlyList<GenerationRequest> requests) =>
        Locked(terms, plan => GenerateLocked(terms, plan, requests));

    /// <summary>
    /// The summed cross-entropy of <paramref name="targets"/> (-100: not counted) under the weighted sum of the terms'
    /// logits, and how many targets counted: the teacher-forced loss of the combined distribution (softmax of the
    /// summed logits, as proxy-tuning defines it). <paramref name="tokens"/> and <paramref name="targets"/> are B rows
    /// of equal length; each row runs under every term, the terms on one model as one mixed batch.
    /// </summary>
    public static (double LossSum, int Counted) Loss(IReadOnlyList<LogitTerm> terms, int[] tokens, int[] targets, int batch) => Locked(terms, plan =>
    {
        if (batch < 1 || tokens.Length % batch != 0 || targets.Length != tokens.Length)
        {
            throw new ArgumentException($"logit arithmetic loss: {tokens.Length} tokens and {targets.Length} targets are not {batch} rows of one length");
        }

        int t = tokens.Length / batch, vocab = plan.Vocab;
        var rowsOf = Enumerable.Range(0, batch).Select(b => tokens[(b * t)..((b + 1) * t)]).ToArray();
        var combined = new double[tokens.Length * (long)vocab > int.MaxValue ? throw new ArgumentException("logit arithmetic loss: batch too large") : tokens.Length * vocab];
        foreach (var model in plan.Models)
        {
            var mine = Enumerable.Range(0, terms.Count).Where(k => terms[k].Model == model).ToList();
            var rows = Enumerable.Range(0, batch).SelectMany(b => mine.Select(k => (Row: b, Term: k))).ToList();
            var caches = rows.Select(_ => new KvCache(model, t)).ToArray();
            try
            {
                float[][] logits;
                using (var bound = plan.SetOf[model]?.Bind(rows.SelectMany(x => Enumerable.Repeat(plan.VariantOf[x.Term], t)).ToArray()))
                {
                    logits = model.DecodeBatchEveryPosition(caches, rows.Select(x => rowsOf[x.Row]).ToArray(), bound);
                }

                for (int j = 0; j < rows.Count; j++)
                {
                    double w = terms[rows[j].Term].Weight;
                    for (int p = 0; p < t; p++)
                    {
                        var l = logits[j * t + p];
                        int at = (rows[j].Row * t + p) * vocab;
                        for (int v = 0; v < vocab; v++) combined[at + v] += w * l[v];
                    }
                }
            }
            finally
            {
                foreach (var c in caches) c.Dispose();
            }
        }

        double sum = 0;
        int counted = 0;
        for (int i = 0; i < tokens.Length; i++)
        {
            if (targets[i] < 0) continue;
            var row = combined.AsSpan(i * vocab, vocab);
            double max = double.NegativeInfinity;
            foreach (double v in row) max = Math.Max(max, v);
            double z = 0;
            foreach (double v in row) z += Math.Exp(v - max);
            sum += max + Math.Log(z) - row[targets[i]];
            counted++;
        }

        return (sum, counted);
    });

    /// <summary>What every use checks and works out of the terms first: their models, each term's variant index, each model's variant set.</summary>
    private sealed record Plan(List<LlamaModel> Models, int[] VariantOf, Dictionary<LlamaModel, VariantSet?> SetOf, int Vocab);

    /// <summary>Checks the terms, then runs <paramref name="body"/> holding every model's generation lock (taken in one global order).</summary>
    private static T Locked<T>(IReadOnlyList<LogitTerm> terms, Func<Plan, T> body)
    {
        if (terms.Count == 0) throw new ArgumentException("logit arithmetic: no terms");
        var models = terms.Select(t => t.Model).Distinct().ToList();
        var locks = models.OrderBy(RuntimeHelpers.GetHashCode).Select(m => m.GenerationLock).ToList();
        var taken = new List<Lock>();
        try
        {
            foreach (var l in locks)
            {
                l.Enter();
                taken.Add(l);
            }

            return body(PlanOf(terms, models));
        }
        finally
        {
            foreach (var l in taken) l.Exit();
        }
    }

    private static Plan PlanOf(IReadOnlyList<LogitTerm> terms, List<LlamaModel> models)
    {
        var first = terms[0].Model;
        int vocab = first.Config.VocabSize;
        var variantOf = new int[terms.Count];
        for (int t = 0; t < terms.Count; t++)
        {
            var term = terms[t];
            if (!float.IsFinite(term.Weight)) throw new ArgumentException($"logit term {t}: weight {term.Weight} is not finite");
            if (term.Model.Config.VocabSize != vocab)
            {
                throw new ArgumentException($"logit term {t}: its model's vocabulary has {term.Model.Config.VocabSize} tokens, the first term's {vocab}; their logits cannot be added");
            }

            if (term.Variants != null && !ReferenceEquals(term.Variants.Model, term.Model)) throw new ArgumentException($"logit term {t}: its variant set belongs to another model");
            variantOf[t] = term.Variants?.IndexOf(term.Variant) ?? (string.IsNullOrEmpty(term.Variant) || term.Variant == "base"
                ? -1
                : throw new ArgumentException($"logit term {t} names variant '{term.Variant}' but gives no variant set"));
        }

        // The terms on one model are rows of one mixed batch, so they share its variant set.
        var setOf = new Dictionary<LlamaModel, VariantSet?>();
        foreach (var model in models)
        {
            var sets = terms.Where(t => t.Model == model && t.Variants != null).Select(t => t.Variants).Distinct().ToList();
            setOf[model] = sets.Count <= 1 ? sets.FirstOrDefault() : throw new ArgumentException("logit terms on one model must share one variant set (they run as one mixed batch)");
        }

        return new Plan(models, variantOf, setOf, vocab);
    }

    private static IReadOnlyList<GenerationResult> GenerateLocked(IReadOnlyList<LogitTerm> terms, Plan plan, IReadOnlyList<GenerationRequest> requests)
    {
        var (models, variantOf, setOf, vocab) = (plan.Models, plan.VariantOf, plan.SetOf, plan.Vocab);
        var first = terms[0].Model;
        int n = requests.Count;
        var prompts = new int[n][];
        for (int i = 0; i < n; i++)
        {
            var r = requests[i];
            if (r.Variant != null && r.Variant != "base") throw new ArgumentException($"request {i} names variant '{r.Variant}': under logit arithmetic the terms choose the variants");
            if (r.PrefixLevels.Count > 0) throw new ArgumentException($"request {i}: shared prefixes are not served under logit arithmetic; put the prefix in the prompt");
            if (r.MaxTokens < 0) throw new ArgumentException($"request {i}: max tokens {r.MaxTokens} is negative");
            var tokens = first.Tokenizer.EncodeStart(r.Prompt);
            prompts[i] = tokens.Count > 0 ? tokens.ToArray() : throw new ArgumentException($"request {i}: empty prompt, and tokenizer {first.Tokenizer.Name} adds no BOS to continue from");
            foreach (var m in models.Skip(1))
            {
                if (!m.Tokenizer.EncodeStart(r.Prompt).SequenceEqual(prompts[i]))
                {
                    throw new ArgumentException($"request {i}: tokenizer {m.Tokenizer.Name} reads the prompt as other tokens than {first.Tokenizer.Name}; logit arithmetic needs one tokenizer");
                }
            }
        }

        int limit = models.Min(m => m.Config.ContextLimit);
        var stops = first.StopTokens.ToHashSet();
        var outputs = requests.Select(_ => new List<int>()).ToArray();
        var rngs = requests.Select(r => new Random(r.Seed)).ToArray();
        // caches[i][t]: request i's cache under term t.
        var caches = new KvCache?[n][];
        foreach (var model in models)
        {
            long positions = terms.Count(t => t.Model == model) * (long)Enumerable.Range(0, n).Sum(i => Math.Min(limit, prompts[i].Length + requests[i].MaxTokens));
            ModelMemory.EnsureFits(model.Device, ModelMemory.KvCacheBytes(model.Config, positions), $"the KV caches of {n} requests under {terms.Count(t => t.Model == model)} terms");
        }

        try
        {
            for (int i = 0; i < n; i++)
            {
                if (prompts[i].Length > limit) throw new ArgumentException($"request {i}: prompt of {prompts[i].Length} tokens exceeds the context of {limit} positions");
                caches[i] = new KvCache?[terms.Count];
                int capacity = Math.Min(limit, prompts[i].Length + requests[i].MaxTokens);
                for (int t = 0; t < terms.Count; t++)
                {
                    caches[i][t] = new KvCache(terms[t].Model, capacity, terms[t].Variants?.PrefixOf(variantOf[t]));
                }
            }

            var pending = prompts.ToArray();
            var live = Enumerable.Range(0, n).Where(i => requests[i].MaxTokens > 0).ToList();
            var termsOf = models.ToDictionary(m => m, m => Enumerable.Range(0, terms.Count).Where(t => terms[t].Model == m).ToList());
            while (live.Count > 0)
            {
                var combined = live.Select(_ => new double[vocab]).ToArray();
                foreach (var model in models)
                {
                    // Row (slot, term): live request live[slot] under term; combined[slot] sums its terms.
                    var rows = Enumerable.Range(0, live.Count).SelectMany(slot => termsOf[model].Select(t => (Slot: slot, Request: live[slot], Term: t))).ToList();
                    var set = setOf[model];
                    float[][] logits;
                    using (var bound = set?.Bind(rows.SelectMany(x => Enumerable.Repeat(variantOf[x.Term], pending[x.Request].Length)).ToArray()))
                    {
                        logits = model.DecodeBatch(rows.Select(x => caches[x.Request][x.Term]!).ToArray(), rows.Select(x => pending[x.Request]).ToArray(), bound);
                    }

                    for (int j = 0; j < rows.Count; j++)
                    {
                        var sum = combined[rows[j].Slot];
                        double w = terms[rows[j].Term].Weight;
                        var l = logits[j];
                        for (int v = 0; v < vocab; v++) sum[v] += w * l[v];
                    }
                }

                var next = new List<int>();
                for (int j = 0; j < live.Count; j++)
                {
                    int i = live[j];
                    var r = requests[i];
                    var scores = combined[j].Select(v => (float)v).ToArray();
                    int token = Generator.Next(r, scores, rngs[i]);
                    bool done = token == first.Tokenizer.Eos || stops.Contains(token);
                    if (!done) outputs[i].Add(token);
                    done |= outputs[i].Count >= r.MaxTokens || caches[i][0]!.Length >= caches[i][0]!.Capacity;
                    if (done) continue;
                    pending[i] = new[] { token };
                    next.Add(i);
                }

                live = next;
            }

            return Enumerable.Range(0, n).Select(i => new GenerationResult(requests[i], first.Tokenizer.Decode(outputs[i]), outputs[i].Count)).ToArray();
        }
        finally
        {
            foreach (var row in caches)
            {
                if (row == null) continue;
                foreach (var c in row) c?.Dispose();
            }
        }
    }
}
