using System.CommandLine;
using System.Text.Json.Nodes;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Serving;
using PeftSharp.Training;
using PeftSharp.Variants;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft eval`: loss, perplexity and exact match of a model, and of its adapters and deltas in one mixed batch.</summary>
internal static class EvalCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var adapters = new Option<string[]>("--adapter") { Description = "A PEFT adapter folder to score (LoRA, DoRA, IA3, LN tuning, prefix tuning, or SSF): DIR or name=DIR, repeatable",
            AllowMultipleArgumentsPerToken = true };
        var deltas = new Option<string[]>("--delta") { Description = "A 1-bit (peft compress) or sparse delta folder to score: DIR or name=DIR, repeatable",
            AllowMultipleArgumentsPerToken = true };
        var prefixes = new Option<string[]>("--prefix") { Description = "A PEFT prefix-tuning folder to score: DIR or name=DIR, repeatable", AllowMultipleArgumentsPerToken = true };
        var examples = new Option<int>("--examples") { Description = "builtin tasks: held-out examples to score", DefaultValueFactory = _ => 64 };
        var perExample = new Option<string?>("--per-example")
        {
            Description = "Write each example's loss under every variant and its log-likelihood ratio to the base (the out-of-distribution score) as JSON lines to this file",
        };
        var eval = new Command("eval", "Loss, perplexity and exact-match accuracy of a model on all of a data file (or the built-in tasks' held-out split); with --adapter, " +
            "--delta or --prefix, of each variant too, one row each, all scored in one mixed batch over the base weights.");
        var arithmeticOptions = new LogitArithmeticOptions();
        foreach (var opt in new Option[] { o.Device, o.Model, o.Data, adapters, deltas, prefixes, examples, perExample, o.SeqLen, o.Seed, o.Json }.Concat(arithmeticOptions.All))
        {
            eval.Options.Add(opt);
        }

        eval.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Model)!, r.GetValue(o.Data)!, Named(r.GetValue(adapters), "--adapter"), Named(r.GetValue(deltas), "--delta"),
            Named(r.GetValue(prefixes), "--prefix"), SharedOptions.Positive("--examples", r.GetValue(examples)), SharedOptions.Positive("--seq-len", r.GetValue(o.SeqLen)),
            r.GetValue(o.Seed), r.GetValue(o.Json), r.GetValue(perExample), arithmeticOptions.Read(r), stdout));
        return eval;
    }

    /// <summary>DIR or name=DIR entries of <paramref name="flag"/>; a bare DIR is named by its folder name.</summary>
    private static IReadOnlyList<(string Name, string Folder, string Flag)> Named(string[]? values, string flag) =>
        RequestFile.ParseNamedFolders(flag, (values ?? Array.Empty<string>()).SelectMany(v => v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            .Select(v => v.Contains('=') ? v : $"{Path.GetFileName(Path.TrimEndingDirectorySeparator(v))}={v}")).Select(n => (n.Name, n.Folder, flag)).ToList();

    private static int Run(string? deviceSpec, string modelDir, string dataSpec, IReadOnlyList<(string Name, string Folder, string Flag)> adapters,
        IReadOnlyList<(string Name, string Folder, string Flag)> deltas, IReadOnlyList<(string Name, string Folder, string Flag)> prefixes, int builtinExamples, int seqLen, int seed,
        bool json, string? perExamplePath, LogitArithmeticOptions.Request arithmetic, TextWriter stdout)
    {
        if (arithmetic.Any && perExamplePath != null) throw new ArgumentException("--per-example scores the variants one by one; it does not apply with --contrast or --proxy-base");
        var variants = adapters.Concat(deltas).Concat(prefixes).ToList();
        var twice = variants.GroupBy(v => v.Name).FirstOrDefault(g => g.Count() > 1 || g.Key == "base");
        if (twice != null) throw new ArgumentException($"{twice.First().Flag}: the name '{twice.Key}' is {(twice.Key == "base" ? "the base model's" : "given twice")}; name it with name=DIR");
        var console = Host.Console(stdout);
        using var device = Host.OpenDevice(deviceSpec);
        using var model = Host.LoadTextModel(modelDir, device);
        // The whole file is scored (a file is not split here); built-in tasks score their held-out split.
        var held = Jobs.ScoredExamples(dataSpec, seed, model.Tokenizer, seqLen, builtinExamples);
        // Examples with a prompt (every built-in task, JSONL prompt/completion) are scored on their completions, as
        // fine-tuning trains them and as the quickstart reports them; documents on every token.
        bool completionOnly = held.Any(e => e.HasPrompt);
        string scoring = completionOnly ? "loss on completions" : "loss on every token";
        using var set = new VariantSet(model);
        foreach (var (name, folder, flag) in variants)
        {
            var variant = VariantFolder.Load(folder, model);
            string? wrong = (flag, variant) switch
            {
                ("--adapter", PeftLoraAdapter or PeftPrefixAdapter or PeftIa3Adapter or PeftLnTuningAdapter or SsfAdapter) or ("--prefix", PeftPrefixAdapter)
                    or ("--delta", PeftSharp.Compression.BitDelta or SparseDelta) => null,
                _ => $"{flag} {folder}: holds a {variant.GetType().Name}, not what {flag} takes",
            };
            if (wrong != null) throw new ArgumentException(wrong);
            set.Add(name, variant);
        }

        var names = new List<string?> { null };
        names.AddRange(variants.Select(v => (string?)v.Name));
        var (results, losses) = Evaluator.EvaluateVariantsPerExample(model, set, names, held, seqLen, completionOnly);
        if (perExamplePath != null)
        {
            var lines = held.Select((e, x) => new JsonObject
            {
                ["example"] = x, ["task"] = e.Task,
                ["loss"] = new JsonObject(names.Select((n, v) => KeyValuePair.Create(n ?? "base", (JsonNode?)(double.IsNaN(losses[v][x]) ? null : losses[v][x])))),
                ["log_likelihood_ratio"] = new JsonObject(names.Skip(1).Select((n, v) => KeyValuePair.Create(n!,
                    (JsonNode?)(double.IsNaN(losses[0][x]) ? null : losses[0][x] - losses[v + 1][x])))),
            }.ToJsonString());
            PeftSharp.Formats.AtomicFile.WriteText(perExamplePath, string.Join("\n", lines) + "\n");
        }

        // A decoder over summed logits is one more row: its combined distribution's loss and its greedy exact match.
        var labels = names.Select(n => n ?? "base").ToList();
        var all = results.ToList();
        if (arithmetic.Any)
        {
            var (terms, what, owned) = arithmetic.Terms(device, model, set);
            try
            {
                all.Add(Evaluator.EvaluateCombined(terms, held, seqLen, completionOnly));
                labels.Add(what);
            }
            finally
            {
                foreach (var d in owned) d.Dispose();
            }
        }

        if (json)
        {
            for (int i = 0; i < all.Count; i++)
            {
                var r = all[i];
                stdout.WriteLine(new JsonObject
                {
                    ["variant"] = labels[i], ["data"] = dataSpec, ["examples"] = r.Examples, ["loss"] = r.Loss, ["perplexity"] = r.Perplexity,
                    ["exact_match"] = r.Matched > 0 ? r.ExactMatch : null, ["exact_match_examples"] = r.Matched, ["scoring"] = scoring,
                }.ToJsonString());
            }

            return 0;
        }

        var jobs = new Jobs(console, true);
        for (int i = 0; i < all.Count; i++) jobs.PrintEval($"{(all.Count > 1 ? labels[i] + ": " : "")}{dataSpec} ({scoring})", all[i]);
        return 0;
    }
}
