using System.CommandLine;
using PeftSharp.Formats;
using PeftSharp.Merging;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft merge`: an adapter or delta into a model, or several models by a mergekit config.</summary>
internal static class MergeCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var adapterDir = new Option<string?>("--adapter") { Description = "An adapter folder: PEFT LoRA/DoRA, IA3 or LN tuning (adapter_config.json), or SSF" };
        var deltaDir = new Option<string?>("--delta") { Description = "1-bit delta (peft compress) or sparse delta folder" };
        var mergeConfig = new Option<string?>("--config")
        {
            Description = "A mergekit config (YAML or JSON): linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, " +
                "karcher, sce, model_stock, passthrough (slices)",
        };
        var mergeModel = new Option<string?>("--model") { Description = "Hugging Face model folder (not with --config, which names its models)" };
        var interpolate = new Option<string?>("--interpolate")
        {
            Description = "A fine-tune of --model: write the WiSE-FT curve (held-out loss and exact match of (1 - alpha) base + alpha fine-tune) instead of a model",
        };
        var points = new Option<int>("--points") { Description = "--interpolate: alphas from 0 to 1", DefaultValueFactory = _ => 11 };
        var examples = new Option<int>("--examples") { Description = "--interpolate on builtin tasks: held-out examples to score", DefaultValueFactory = _ => 64 };
        var merge = new Command("merge", "Merge an adapter, a 1-bit or sparse delta into a model, or several models by a mergekit config; writes a Hugging Face folder (or, " +
            "with --interpolate, a WiSE-FT curve).");
        foreach (var opt in new Option[] { o.Device, mergeModel, adapterDir, deltaDir, mergeConfig, interpolate, o.Data, points, examples, o.SeqLen, o.Seed, o.Out, o.Overwrite })
        {
            merge.Options.Add(opt);
        }

        merge.SetAction(r => r.GetValue(interpolate) is { } fine
            ? Curve(r.GetValue(o.Device), r.GetValue(mergeModel), fine, r.GetValue(o.Data)!, r.GetValue(points), r.GetValue(examples), r.GetValue(o.SeqLen), r.GetValue(o.Seed),
                r.GetValue(o.Out)!, new[] { ("--adapter", r.GetValue(adapterDir)), ("--delta", r.GetValue(deltaDir)), ("--config", r.GetValue(mergeConfig)) }, stdout)
            : Run(r.GetValue(o.Device), r.GetValue(mergeModel), r.GetValue(adapterDir), r.GetValue(deltaDir), r.GetValue(mergeConfig), r.GetValue(o.Out)!, r.GetValue(o.Overwrite), stdout));
        return merge;
    }

    /// <summary>The file names the WiSE-FT curve is written under in --out.</summary>
    public const string CurveJson = "wise_ft.json", CurveSvg = "wise_ft.svg";

    private static int Curve(string? deviceSpec, string? modelDir, string fineDir, string dataSpec, int points, int examples, int seqLen, int seed, string outDir,
        (string Flag, string? Value)[] others, TextWriter stdout)
    {
        if (modelDir == null) throw new ArgumentException("merge --interpolate: --model names the base");
        if (others.FirstOrDefault(x => x.Value != null) is { Flag: { } flag, Value: not null }) throw new ArgumentException($"merge --interpolate: {flag} does not go with it");
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = Host.LoadTextModel(modelDir, device);
        using var fine = Host.LoadTextModel(fineDir, device);
        var held = dataSpec.StartsWith("builtin:", StringComparison.Ordinal)
            ? Jobs.Data(dataSpec, seed, baseModel.Tokenizer, seqLen, builtinHeldOut: examples).HeldOut
            : Jobs.ReadFile(dataSpec, "--data", baseModel.Tokenizer, seqLen);
        var curve = Interpolation.Curve(baseModel, fine, held, seqLen, points);
        Directory.CreateDirectory(outDir);
        var json = new System.Text.Json.Nodes.JsonArray(curve.Select(c => (System.Text.Json.Nodes.JsonNode)new System.Text.Json.Nodes.JsonObject
        {
            ["alpha"] = c.Alpha, ["loss"] = c.Result.Loss, ["exact_match"] = c.Result.Matched > 0 ? c.Result.ExactMatch : null, ["examples"] = c.Result.Examples,
        }).ToArray());
        AtomicFile.WriteText(Path.Combine(outDir, CurveJson), json.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        var series = new List<(string, IReadOnlyList<(double, double)>)> { ("loss", curve.Select(c => (c.Alpha, c.Result.Loss)).ToList()) };
        string title = $"WiSE-FT: {Path.GetFileName(Path.GetFullPath(fineDir))} over its base";
        AtomicFile.WriteText(Path.Combine(outDir, CurveSvg), PeftSharp.Analysis.SvgChart.Lines(title, "alpha", "held-out loss", series));
        foreach (var (alpha, r) in curve) stdout.WriteLine($"alpha {alpha:F2}: loss {r.Loss:F4}{(r.Matched > 0 ? $", exact match {r.ExactMatch:P1}" : "")}");
        var best = curve.MinBy(c => c.Result.Loss);
        stdout.WriteLine($"lowest loss at alpha {best.Alpha:F2}; {CurveJson} and {CurveSvg} written to {Path.GetFullPath(outDir)}");
        return 0;
    }

    private static int Run(string? deviceSpec, string? modelDir, string? adapterDir, string? deltaDir, string? configPath, string outDir, bool overwrite, TextWriter stdout)
    {
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--model", modelDir), ("--adapter", adapterDir), ("--delta", deltaDir));
        if (new[] { adapterDir, deltaDir, configPath }.Count(x => x != null) != 1) throw new ArgumentException("merge: give one of --adapter, --delta or --config");
        using var device = Host.OpenDevice(deviceSpec);
        if (configPath != null)
        {
            if (modelDir != null) throw new ArgumentException("merge --config: the config names its models (base_model, models or slices); drop --model");
            var config = MergeConfig.Load(configPath);
            using var merged = MergeRunner.Run(config, Path.GetDirectoryName(Path.GetFullPath(configPath))!, device);
            HuggingFaceFolder.Save(merged, outDir, MergeRunner.Storage(config));
            string lines = config.LinesAlpha is float a ? $", LiNeS layer scaling {a} -> {config.LinesBeta}" : "";
            string slices = config.Slices.Count > 1 ? $" in {config.Slices.Count} slices ({merged.Config.NumHiddenLayers} layers)" : "";
            stdout.WriteLine($"merged {config.Models.Count} models by {MergeConfig.Methods.First(m => m.Value == config.Method).Key}{slices}{lines} into {Path.GetFullPath(outDir)} " +
                $"({config.Dtype})");
            return 0;
        }

        if (modelDir == null) throw new ArgumentException("merge: --model is required with --adapter or --delta");
        using var model = HuggingFaceFolder.Load(modelDir, device, Host.Warn);
        string what = adapterDir != null
            ? MergeRunner.ApplyFolder(model, adapterDir, adapters: true, deltas: false)
            : MergeRunner.ApplyFolder(model, deltaDir!, adapters: false, deltas: true);

        HuggingFaceFolder.Save(model, outDir);
        Host.CopyModelExtras(modelDir, outDir);
        stdout.WriteLine($"merged {what} into {Path.GetFullPath(outDir)}");
        return 0;
    }
}
