using System.CommandLine;
using PeftSharp.Formats;
using PeftSharp.Merging;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft merge`: an adapter or delta into a model, or several models by a mergekit config.</summary>
internal static class MergeCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var adapterDir = new Option<string?>("--adapter") { Description = "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)" };
        var deltaDir = new Option<string?>("--delta") { Description = "1-bit delta (peft compress) or sparse delta folder" };
        var mergeConfig = new Option<string?>("--config")
        {
            Description = "A mergekit config (YAML or JSON): slerp, model_stock, della, della_linear, linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties",
        };
        var mergeModel = new Option<string?>("--model") { Description = "Hugging Face model folder (not with --config, which names its models)" };
        var merge = new Command("merge", "Merge a PEFT LoRA adapter, a 1-bit or sparse delta into a model, or several models by a mergekit config; writes a Hugging Face folder.");
        foreach (var opt in new Option[] { o.Device, mergeModel, adapterDir, deltaDir, mergeConfig, o.Out, o.Overwrite }) merge.Options.Add(opt);
        merge.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(mergeModel), r.GetValue(adapterDir), r.GetValue(deltaDir), r.GetValue(mergeConfig), r.GetValue(o.Out)!,
            r.GetValue(o.Overwrite), stdout));
        return merge;
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
        CopyModelExtras(modelDir, outDir);
        stdout.WriteLine($"merged {what} into {Path.GetFullPath(outDir)}");
        return 0;
    }

    private static void CopyModelExtras(string from, string to)
    {
        foreach (var extra in new[] { "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json" })
        {
            string src = Path.Combine(from, extra);
            if (File.Exists(src)) File.Copy(src, Path.Combine(to, extra), overwrite: true);
        }
    }
}
