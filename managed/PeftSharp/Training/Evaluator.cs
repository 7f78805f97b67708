using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Serving;

namespace PeftSharp.Training;

/// <summary>Held-out loss, perplexity and exact match of a model on examples.</summary>
public static class Evaluator
{
    /// <summary>Requests generated together for exact match: one batch through the serving path.</summary>
    public const int ExactMatchBatch = 64;

    /// <summary>
    /// Mean cross-entropy over the counted targets (completions when <paramref name="completionOnly"/>, every token of
    /// document windows), its perplexity, and exact match: the share of examples with a prompt whose greedy
    /// continuation is exactly the completion. Exact match generates at most the completion's own token count (more
    /// could never match) and runs <see cref="ExactMatchBatch"/> prompts at a time through <see cref="BatchGenerator"/>;
    /// examples without a prompt (document windows) are not matched. <paramref name="progress"/> hears
    /// ("loss" | "exact match", done, total) as it goes.
    /// </summary>
    public static EvalResult Evaluate(LlamaModel model, IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true, int batchSize = 16,
        Action<string, int, int>? progress = null)
    {
        var (lossSum, counted) = SummedLoss(examples, model.Tokenizer, seqLen, completionOnly, batchSize, progress, (ids, targets, rows) =>
        {
            var (mean, c) = model.Loss(ids, targets, rows, backward: false);
            return (mean * c, c);
        });
        var matchable = examples.Where(e => e.HasPrompt).ToList();
        int correct = ExactMatches(model.Tokenizer, new string?[] { null }, matchable, progress, chunk => BatchGenerator.Generate(model, chunk, null, PrefixSharing.Off))[0];
        return Result(lossSum, counted, correct, matchable.Count, examples.Count);
    }

    /// <summary>The summed loss and the counted targets of <paramref name="examples"/>, <paramref name="batchSize"/> rows at a time through <paramref name="loss"/>.</summary>
    private static (double Sum, int Counted) SummedLoss(IReadOnlyList<Example> examples, ITokenizer tok, int seqLen, bool completionOnly, int batchSize,
        Action<string, int, int>? progress, Func<int[], int[], int, (double Sum, int Counted)> loss)
    {
        double lossSum = 0;
        int counted = 0;
        for (int i = 0; i < examples.Count; i += batchSize)
        {
            var batch = examples.Skip(i).Take(batchSize).ToList();
            var (ids, targets) = Batcher.Encode(batch, tok, seqLen, completionOnly);
            var (l, c) = loss(ids, targets, batch.Count);
            lossSum += l;
            counted += c;
            progress?.Invoke("loss", i + batch.Count, examples.Count);
        }

        return (lossSum, counted);
    }

    /// <summary>The result of a summed loss over counted targets and <paramref name="correct"/> exact matches of <paramref name="matched"/>.</summary>
    private static EvalResult Result(double lossSum, int counted, int correct, int matched, int examples)
    {
        double loss = counted == 0 ? 0 : lossSum / counted;
        return new EvalResult(loss, Math.Exp(loss), matched == 0 ? 0 : (double)correct / matched, examples) { Matched = matched };
    }

    /// <summary>
    /// <see cref="Evaluate"/> for a decoder that sums several models' logits (contrastive generation, proxy-tuning;
    /// see <see cref="LogitArithmetic"/>): the loss of the combined distribution (softmax of the summed logits) on the
    /// same targets, and exact match of its greedy decoding, the tokenizer and stop tokens the first term's.
    /// </summary>
    public static EvalResult EvaluateCombined(IReadOnlyList<LogitTerm> terms, IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true, int batchSize = 16)
    {
        if (terms.Count == 0) throw new ArgumentException("logit arithmetic: no terms");
        var tok = terms[0].Model.Tokenizer;
        var (lossSum, counted) = SummedLoss(examples, tok, seqLen, completionOnly, batchSize, null, (ids, targets, rows) => LogitArithmetic.Loss(terms, ids, targets, rows));
        var matchable = examples.Where(e => e.HasPrompt).ToList();
        int correct = ExactMatches(tok, new string?[] { null }, matchable, null, chunk => LogitArithmetic.Generate(terms, chunk))[0];
        return Result(lossSum, counted, correct, matchable.Count, examples.Count);
    }

    /// <summary>
    /// <see cref="Evaluate"/> for several variants of one model at once (null or "base": the base model), one result
    /// per name: every (variant, example) pair is a row of one mixed batch over the shared weights, each row with its
    /// own LoRA, DoRA, 1-bit, sparse or prefix variant from <paramref name="set"/> (<see cref="LlamaModel.DecodeBatchEveryPosition"/>
    /// for the loss, <see cref="BatchGenerator"/> for exact match), so N adapters cost one pass over the base weights
    /// per batch instead of N models. Loss is accumulated in double from each row's log-softmax.
    /// </summary>
    public static IReadOnlyList<EvalResult> EvaluateVariants(LlamaModel model, VariantSet? set, IReadOnlyList<string?> variants, IReadOnlyList<Example> examples, int seqLen,
        bool completionOnly = true, int rowsPerBatch = 16, Action<string, int, int>? progress = null) =>
        EvaluateVariantsCore(model, set, variants, examples, seqLen, completionOnly, rowsPerBatch, progress, exactMatch: true).Results;

    /// <summary>
    /// <see cref="EvaluateVariants"/>, and from the same pass each example's mean loss per counted token under each
    /// variant: [variant][example], NaN for an example with no counted target.
    /// </summary>
    public static (IReadOnlyList<EvalResult> Results, double[][] ExampleLosses) EvaluateVariantsPerExample(LlamaModel model, VariantSet? set, IReadOnlyList<string?> variants,
        IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true, int rowsPerBatch = 16, Action<string, int, int>? progress = null) =>
        EvaluateVariantsCore(model, set, variants, examples, seqLen, completionOnly, rowsPerBatch, progress, exactMatch: true);

    /// <summary>
    /// Each example's mean loss per counted token under each variant (null or "base": the base), from the same mixed
    /// batch as <see cref="EvaluateVariants"/> without its exact-match generation: [variant][example], NaN for an
    /// example with no counted target.
    /// </summary>
    public static double[][] ExampleLosses(LlamaModel model, VariantSet? set, IReadOnlyList<string?> variants, IReadOnlyList<Example> examples, int seqLen,
        bool completionOnly = true, int rowsPerBatch = 16) =>
        EvaluateVariantsCore(model, set, variants, examples, seqLen, completionOnly, rowsPerBatch, null, exactMatch: false).ExampleLosses;

    /// <summary>
    /// The likelihood-ratio score of each example between the base and <paramref name="variant"/>, from one mixed batch:
    /// the base's mean loss per token minus the variant's, log p_variant(x) / p_base(x) per token in nats. High where the
    /// fine-tune finds the text far likelier than its base did (its own distribution), near 0 or below elsewhere: an
    /// out-of-distribution score that needs no data of its own.
    /// </summary>
    public static double[] LikelihoodRatios(LlamaModel model, VariantSet set, string variant, IReadOnlyList<Example> examples, int seqLen, bool completionOnly = true)
    {
        var losses = ExampleLosses(model, set, new[] { null, variant }, examples, seqLen, completionOnly);
        return losses[0].Select((b, i) => b - losses[1][i]).ToArray();
    }

    private static (IReadOnlyList<EvalResult> Results, double[][] ExampleLosses) EvaluateVariantsCore(LlamaModel model, VariantSet? set, IReadOnlyList<string?> variants,
        IReadOnlyList<Example> examples, int seqLen, bool completionOnly, int rowsPerBatch, Action<string, int, int>? progress, bool exactMatch)
    {
        if (set != null && !ReferenceEquals(set.Model, model)) throw new ArgumentException("the variant set belongs to another model");
        var tok = model.Tokenizer;
        int[] index = variants.Select(v => string.IsNullOrEmpty(v) || v == "base" ? -1
            : set?.IndexOf(v) ?? throw new ArgumentException($"variant '{v}' named but no variants are loaded")).ToArray();
        // Each example's row: the tokens through its last counted target, and those targets.
        var rows = new List<(int[] Tokens, int[] Targets, int Example)>();
        for (int x = 0; x < examples.Count; x++)
        {
            var (ids, targets) = Batcher.Encode(new[] { examples[x] }, tok, seqLen, completionOnly);
            int used = Array.FindLastIndex(targets, t => t != Batcher.IgnoreIndex) + 1;
            if (used > 0) rows.Add((ids[..used], targets[..used], x));
        }

        var lossSum = new double[variants.Count];
        var counted = new int[variants.Count];
        var rowSum = variants.Select(_ => new double[rows.Count]).ToArray();
        var rowCount = rows.Select(r => r.Targets.Count(t => t != Batcher.IgnoreIndex)).ToArray();
        var pairs = Enumerable.Range(0, variants.Count).SelectMany(v => Enumerable.Range(0, rows.Count).Select(r => (V: v, R: r))).ToList();
        for (int i = 0; i < pairs.Count; i += rowsPerBatch)
        {
            var chunk = pairs.Skip(i).Take(rowsPerBatch).ToList();
            var caches = chunk.Select(p => new KvCache(model, rows[p.R].Tokens.Length, set?.PrefixOf(index[p.V]))).ToArray();
            try
            {
                float[][] logits;
                lock (model.GenerationLock)
                {
                    // An activated LoRA's positions before its invocation are the base's; an example without it is refused.
                    using var bound = set?.Bind(chunk.SelectMany(p => VariantSet.ActivatedRows(index[p.V],
                        set!.RequireActivation(index[p.V], rows[p.R].Tokens, $"example {rows[p.R].Example}"), 0, rows[p.R].Tokens.Length)).ToArray(), activationResolved: true);
                    logits = model.DecodeBatchEveryPosition(caches, chunk.Select(p => rows[p.R].Tokens).ToArray(), bound);
                }

                int at = 0;
                foreach (var (v, r) in chunk)
                {
                    foreach (int t in rows[r].Targets)
                    {
                        if (t != Batcher.IgnoreIndex)
                        {
                            double nll = PeftSharp.Kernels.Core.CrossEntropyReference.LogSumExp(logits[at]) - logits[at][t]; // -log softmax, in double
                            lossSum[v] += nll;
                            counted[v]++;
                            rowSum[v][r] += nll;
                        }

                        at++;
                    }
                }
            }
            finally
            {
                foreach (var cache in caches) cache.Dispose();
            }

            progress?.Invoke("loss", i + chunk.Count, pairs.Count);
        }

        var perExample = variants.Select(_ => Enumerable.Repeat(double.NaN, examples.Count).ToArray()).ToArray();
        for (int v = 0; v < variants.Count; v++)
        {
            for (int r = 0; r < rows.Count; r++) perExample[v][rows[r].Example] = rowSum[v][r] / rowCount[r];
        }

        var matchable = examples.Where(e => e.HasPrompt).ToList();
        var correct = exactMatch
            ? ExactMatches(model.Tokenizer, variants.Select((v, i) => index[i] < 0 ? null : v).ToList(), matchable, progress, chunk => BatchGenerator.Generate(model, chunk, set, PrefixSharing.Off))
            : new int[variants.Count];
        var results = Enumerable.Range(0, variants.Count).Select(v => Result(lossSum[v], counted[v], correct[v], matchable.Count, examples.Count)).ToList();
        return (results, perExample);
    }

    /// <summary>
    /// For each variant (null: the base), how many of <paramref name="matchable"/> its greedy completion gets exactly:
    /// <see cref="ExactMatchBatch"/> (variant, example) requests at a time through <paramref name="generate"/> (the
    /// serving batch, or a logit-arithmetic decoder), each generating at most the completion's own token count (more
    /// could never match).
    /// </summary>
    private static int[] ExactMatches(ITokenizer tok, IReadOnlyList<string?> variants, IReadOnlyList<Example> matchable, Action<string, int, int>? progress,
        Func<List<GenerationRequest>, IReadOnlyList<GenerationResult>> generate)
    {
        var correct = new int[variants.Count];
        var requests = Enumerable.Range(0, variants.Count).SelectMany(v => matchable.Select(e => (V: v, E: e))).ToList();
        for (int i = 0; i < requests.Count; i += ExactMatchBatch)
        {
            var chunk = requests.Skip(i).Take(ExactMatchBatch).ToList();
            var results = generate(chunk.Select(p => new GenerationRequest(p.E.Prompt, variants[p.V], MaxTokens: tok.EncodeEnd(p.E.Completion).Length)).ToList());
            for (int j = 0; j < chunk.Count; j++)
            {
                if (results[j].Completion == chunk[j].E.Completion) correct[chunk[j].V]++;
            }

            progress?.Invoke("exact match", i + chunk.Count, requests.Count);
        }

        return correct;
    }
}
