using System.Text.RegularExpressions;
using PeftSharp.Compression;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;

using PeftSharp.Variants;

namespace PeftSharp.Merging;

/// <summary>
/// Runs a <see cref="MergeConfig"/>: loads the base and every input (a Hugging Face model folder, a PEFT LoRA adapter,
/// a 1-bit delta or a sparse delta, the last three densified onto the base), merges every parameter with
/// <see cref="TaskVectorMerge"/>, applies LiNeS layer scaling when asked, and returns the merged model. Inputs are
/// held in memory at once (fine for the model sizes PeftSharp trains; streaming per tensor is not implemented).
/// </summary>
public static class MergeRunner
{
    public static LlamaModel Run(MergeConfig config, string configDirectory, Device device)
    {
        string Resolve(string path) => Path.IsPathRooted(path) || Directory.Exists(path) ? path : Path.Combine(configDirectory, path);
        LlamaModel? baseModel = config.BaseModel != null ? HuggingFaceFolder.Load(Resolve(config.BaseModel), device) : null;
        var inputs = new List<LlamaModel>();
        try
        {
            // As mergekit does, the task-vector methods skip a base model that is also listed under models: its task
            // vector is zero, and counting its weight would only dilute the others'.
            string FullPath(string p) => Path.GetFullPath(Resolve(p)).TrimEnd(Path.DirectorySeparatorChar);
            var entries = config.Method == MergeMethod.Linear || config.BaseModel == null
                ? config.Models
                : config.Models.Where(e => FullPath(e.Model) != FullPath(config.BaseModel)).ToList();
            if (entries.Count == 0) throw new PeftSharpInputException($"{config.Method}: every model listed is the base_model; nothing to merge");
            foreach (var entry in entries) inputs.Add(LoadInput(Resolve(entry.Model), baseModel, device));
            var reference = baseModel ?? inputs[0];
            foreach (var m in inputs)
            {
                var diff = LlamaConfig.Differences(reference.Config, m.Config);
                if (diff.Count > 0) throw new PeftSharpInputException($"a merged model's config differs: {string.Join("; ", diff)}");
            }


            // The merged folder carries a tokenizer: tokenizer_source's folder, else the base's, else the first model's.
            string? tokenizerFolder = config.TokenizerSource is { } src && src != "base" ? Resolve(src)
                : config.BaseModel != null ? Resolve(config.BaseModel)
                : config.Models.Select(e => Resolve(e.Model)).FirstOrDefault(f => File.Exists(Path.Combine(f, HuggingFaceFolder.ConfigFile)));
            int layers = reference.Config.NumHiddenLayers;
            foreach (var (model, from, to) in config.LayerRanges)
            {
                if (from != 0 || to != layers) throw new NotSupportedException($"slices: {model} layer_range [{from}, {to}] is not the whole model [0, {layers}]: layer stacking is not supported");
            }

            var merged = LlamaModel.FromTensors(device, reference.Config, (name, _) =>
            {
                // mergekit's planner evaluates gradients (list-valued parameters) at layer i of L at depth i / (L - 1)
                // (1 for a single layer); embeddings, the final norm and the LM head at depth 0.
                double depth = LayerOf(name) is int layer ? (layers > 1 ? (double)layer / (layers - 1) : 1) : 0;
                if (config.Method == MergeMethod.Slerp)
                {
                    var t = config.T.FirstOrDefault(e => e.Filter == null || name.Contains(e.Filter, StringComparison.Ordinal))
                        ?? throw new PeftSharpInputException($"slerp: no entry of parameters.t applies to {name} (add one without a filter)");
                    return TaskVectorMerge.Slerp(baseModel![name].Value.ToArray(), inputs[0][name].Value.ToArray(), t.At(depth));
                }

                if (config.Method == MergeMethod.ModelStock)
                {
                    var shape = baseModel![name].Value.Shape;
                    return TaskVectorMerge.ModelStock(baseModel[name].Value.ToArray(), inputs.Select(m => m[name].Value.ToArray()).ToList(), config.FilterWise, shape[^1]);
                }

                var values = TaskVectorMerge.Merge(config.Method, baseModel?[name].Value.ToArray(), inputs.Select(m => m[name].Value.ToArray()).ToArray(),
                    entries.Select(e => e.At(depth)).ToArray(), config.Normalize, config.Lambda, Seed(name), config.Rescale, baseModel?[name].Value.Shape[^1] ?? 0);
                if (config.LinesAlpha is float alpha && config.LinesBeta is float beta && baseModel != null)
                {
                    var b = baseModel[name].Value.ToArray();
                    float s = TaskVectorMerge.LinesScale(LayerOf(name), reference.Config.NumHiddenLayers, alpha, beta);
                    for (int i = 0; i < values.Length; i++) values[i] = b[i] + s * (values[i] - b[i]);
                }

                return values;
            });
            if (tokenizerFolder != null)
            {
                if (!Directory.Exists(tokenizerFolder)) throw new DirectoryNotFoundException($"tokenizer_source {tokenizerFolder} does not exist");
                merged.UseTokenizerFiles(tokenizerFolder, PeftSharp.Data.HfTokenizer.ReadFiles(tokenizerFolder));
            }

            return merged;
        }
        finally
        {
            foreach (var m in inputs) m.Dispose();
            baseModel?.Dispose();
        }
    }

    /// <summary>The storage type a config's dtype names.</summary>
    public static StorageType Storage(MergeConfig c) => c.Dtype switch { "float16" => StorageType.F16, "bfloat16" => StorageType.BF16, _ => StorageType.F32 };

    private static LlamaModel LoadInput(string folder, LlamaModel? baseModel, Device device)
    {
        if (File.Exists(Path.Combine(folder, HuggingFaceFolder.ConfigFile))) return HuggingFaceFolder.Load(folder, device);
        if (!VariantFolder.IsVariant(folder))
        {
            throw new FileNotFoundException($"{folder}: neither a model folder (config.json) nor a PEFT adapter, 1-bit delta or sparse delta folder");
        }

        if (baseModel == null) throw new PeftSharpInputException($"{folder} is an adapter or delta: the merge needs a base_model to apply it to");
        var model = LlamaModel.FromTensors(device, baseModel.Config, (name, _) => baseModel[name].Value.ToArray());
        try
        {
            ApplyFolder(model, folder);
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Applies an adapter or delta folder to <paramref name="model"/> (which must be the base it was made for): a PEFT
    /// LoRA/DoRA adapter is merged, a sparse delta added, a 1-bit delta decoded in. With <paramref name="adapters"/> or
    /// <paramref name="deltas"/> false, that kind is not looked for, so a folder of the other kind fails as not found.
    /// Returns what was applied, for the user.
    /// </summary>
    public static string ApplyFolder(LlamaModel model, string folder, bool adapters = true, bool deltas = true)
    {
        // The folder says its kind (VariantFolder); a caller that allows one kind gets an error for the other.
        IVariant variant = adapters && !deltas ? PeftLoraAdapter.Load(folder, model) : VariantFolder.Load(folder, model);
        if (!adapters && variant is not (BitDelta or SparseDelta)) throw new ArgumentException($"{folder} holds a {variant.Kind} adapter, not a 1-bit or sparse delta");
        variant.MergeInto(model);
        return variant.Summary;
    }

    /// <summary>A stable per-tensor seed for DARE (FNV-1a of the name; string.GetHashCode differs per process).</summary>
    private static int Seed(string name)
    {
        uint h = 2166136261;
        foreach (char c in name) h = (h ^ c) * 16777619;
        return (int)h;
    }

    private static int? LayerOf(string name)
    {
        var m = Regex.Match(name, @"^model\.layers\.(\d+)\.");
        return m.Success ? int.Parse(m.Groups[1].Value) : null;
    }
}
