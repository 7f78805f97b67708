using System.CommandLine;
using System.Text.Json.Nodes;
using PeftSharp.Analysis;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft inspect`: spectra, intruder dimensions and condition numbers of a fine-tune (or an adapter or delta) against its base.</summary>
internal static class InspectCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var finetuned = new Option<string?>("--finetuned") { Description = "The fine-tuned model folder (or give --variant)" };
        var variant = new Option<string?>("--variant") { Description = "An adapter or delta folder (PEFT LoRA/DoRA/IA3/LN tuning, SSF, 1-bit, sparse), merged onto a copy of --base" };
        var top = new Option<int>("--top") { Description = "Singular values of each change to report", DefaultValueFactory = _ => 16 };
        var intruders = new Option<int>("--intruders") { Description = "Top singular vectors of each fine-tuned weight checked for intruders", DefaultValueFactory = _ => 10 };
        var threshold = new Option<double>("--threshold") { Description = "An intruder's largest |cosine| with the base's singular vectors is below this", DefaultValueFactory = _ => 0.5 };
        var svg = new Option<string?>("--svg") { Description = "Write the changes' spectra (sigma_i / sigma_1 per module kind) as an SVG picture" };
        var tuco = new Option<bool>("--tuco") { Description = "Instead: TuCo, the share of the forward pass fine-tuning contributes, for each prompt of --data" };
        var data = new Option<string>("--data")
        {
            Description = "With --tuco: builtin:tasks[=NAME,...] | FILE.jsonl | FILE.txt (prompts, or documents whole)", DefaultValueFactory = _ => "builtin:tasks",
        };
        var examples = new Option<int>("--examples") { Description = "With --tuco on built-in tasks: held-out prompts", DefaultValueFactory = _ => 64 };
        var inspect = new Command("inspect", "Spectra, effective ranks, intruder dimensions and condition numbers of a fine-tune's weights against its base; or with --tuco its " +
            "tuning contribution per prompt.");
        foreach (var opt in new Option[] { o.Device, o.Base, finetuned, variant, top, intruders, threshold, svg, tuco, data, examples, o.SeqLen, o.Seed, o.Json }) inspect.Options.Add(opt);
        inspect.SetAction(r =>
        {
            if ((r.GetValue(finetuned) == null) == (r.GetValue(variant) == null)) throw new ArgumentException("inspect: give one of --finetuned or --variant");
            var spectral = new Option[] { top, intruders, threshold, svg }.Where(f => r.GetResult(f) is { Implicit: false }).Select(f => f.Name).ToList();
            var tucoOnly = new Option[] { data, examples, o.SeqLen, o.Seed }.Where(f => r.GetResult(f) is { Implicit: false }).Select(f => f.Name).ToList();
            if (r.GetValue(tuco))
            {
                if (spectral.Count > 0) throw new ArgumentException($"{string.Join(", ", spectral)} {(spectral.Count == 1 ? "does" : "do")} not apply with --tuco");
                return RunTuCo(r.GetValue(o.Device), r.GetValue(o.Base)!, r.GetValue(finetuned), r.GetValue(variant), r.GetValue(data)!, SharedOptions.Positive("--examples", r.GetValue(examples)),
                    SharedOptions.Positive("--seq-len", r.GetValue(o.SeqLen)), r.GetValue(o.Seed), r.GetValue(o.Json), stdout);
            }

            if (tucoOnly.Count > 0) throw new ArgumentException($"{string.Join(", ", tucoOnly)} {(tucoOnly.Count == 1 ? "applies" : "apply")} to --tuco");
            return Run(r.GetValue(o.Device), r.GetValue(o.Base)!, r.GetValue(finetuned), r.GetValue(variant), r.GetValue(top), r.GetValue(intruders), r.GetValue(threshold),
                r.GetValue(svg), r.GetValue(o.Json), stdout);
        });
        return inspect;
    }

    /// <summary>--tuco: each prompt's tuning contribution, as JSON lines or as a mean per task.</summary>
    private static int RunTuCo(string? deviceSpec, string baseDir, string? fineDir, string? variantDir, string dataSpec, int builtinExamples, int seqLen, int seed, bool json,
        TextWriter stdout)
    {
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = Host.LoadTextModel(baseDir, device);
        var held = Jobs.ScoredExamples(dataSpec, seed, baseModel.Tokenizer, seqLen, builtinExamples);
        var prompts = held.Select(e => e.HasPrompt ? e.Prompt : baseModel.Tokenizer.Decode(e.Ids ?? Array.Empty<int>())).ToList();
        IReadOnlyList<TuCoResult> results;
        if (variantDir != null)
        {
            using var set = new PeftSharp.Serving.VariantSet(baseModel);
            set.Add("fine", PeftSharp.Variants.VariantFolder.Load(variantDir, baseModel));
            results = TuningContribution.Measure(set, "fine", prompts);
        }
        else
        {
            using var fine = HuggingFaceFolder.Load(fineDir!, device, Host.Warn);
            results = TuningContribution.Measure(baseModel, fine, prompts);
        }

        if (json)
        {
            for (int i = 0; i < results.Count; i++)
            {
                stdout.WriteLine(new JsonObject
                {
                    ["example"] = i, ["task"] = held[i].Task, ["prompt"] = prompts[i], ["tuco"] = results[i].TuCo,
                    ["layer_shares"] = new JsonArray(results[i].LayerShares.Select(v => (JsonNode)v).ToArray()),
                }.ToJsonString());
            }

            return 0;
        }

        stdout.WriteLine($"TuCo (share of the forward pass fine-tuning contributes, at each prompt's last token) over {results.Count} prompts of {dataSpec}:");
        foreach (var g in results.Select((r, i) => (r.TuCo, held[i].Task)).GroupBy(x => x.Task).OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            stdout.WriteLine($"{g.Key,-12} mean {g.Average(x => x.TuCo):F3}, median {Median(g.Select(x => x.TuCo)):F3} over {g.Count()} prompts");
        }

        return 0;
    }

    private static int Run(string? deviceSpec, string baseDir, string? fineDir, string? variantDir, int top, int intruders, double threshold, string? svg, bool json, TextWriter stdout)
    {
        if (top < 1 || intruders < 1) throw new ArgumentException($"--top {top} and --intruders {intruders} must be at least 1");
        if (threshold is <= 0 or > 1) throw new ArgumentException($"--threshold {threshold}: must be in (0, 1]");
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        using var fine = fineDir != null ? HuggingFaceFolder.Load(fineDir, device, Host.Warn) : HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        if (variantDir != null) MergeRunner.ApplyFolder(fine, variantDir);
        var report = DeltaInspection.Inspect(baseModel, fine, top, intruders, threshold);
        if (svg != null) PeftSharp.Formats.AtomicFile.WriteText(svg, DeltaInspection.SpectraSvg(report, $"spectra of the change, {Path.GetFileName(Path.GetFullPath(fineDir ?? variantDir!))}"));
        if (json)
        {
            foreach (var t in report)
            {
                stdout.WriteLine(new JsonObject
                {
                    ["tensor"] = t.Name, ["shape"] = new JsonArray(t.Rows, t.Cols), ["delta_singular_values"] = new JsonArray(t.DeltaSpectrum.Select(v => (JsonNode)v).ToArray()),
                    ["delta_effective_rank"] = t.DeltaEffectiveRank, ["base_condition"] = Finite(t.BaseCondition), ["finetuned_condition"] = Finite(t.FineCondition),
                    ["intruder_similarities"] = new JsonArray(t.IntruderSimilarities.Select(v => (JsonNode)v).ToArray()), ["intruders"] = t.Intruders,
                }.ToJsonString());
            }

            return 0;
        }

        stdout.WriteLine($"{report.Count} linear weights; intruder = a top-{intruders} singular vector of the fine-tuned weight whose largest |cosine| with the base's is below {threshold}");
        foreach (var g in report.GroupBy(t => t.Name.Split('.')[^2]))
        {
            double baseCondition = Median(g.Select(t => t.BaseCondition)), fineCondition = Median(g.Select(t => t.FineCondition));
            stdout.WriteLine($"{g.Key,-10} change effective rank {g.Average(t => t.DeltaEffectiveRank),7:F1}, top sigma {g.Average(t => t.DeltaSpectrum[0]),9:G4}, " +
                $"intruders {g.Sum(t => t.Intruders),3} over {g.Count()} layers, condition base {baseCondition,9:G4} -> fine-tuned {fineCondition,9:G4}");
        }

        if (svg != null) stdout.WriteLine($"spectra written to {Path.GetFullPath(svg)}");
        return 0;
    }

    private static JsonNode? Finite(double v) => double.IsFinite(v) ? v : null;

    private static double Median(IEnumerable<double> values)
    {
        var s = values.OrderBy(v => v).ToList();
        return s.Count == 0 ? double.NaN : s[s.Count / 2];
    }
}
