using System.Text.RegularExpressions;
using PeftSharp.Compression;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;

using PeftSharp.Variants;

namespace PeftSharp.Merging;

/// <summary>
/// Runs a <see cref="MergeConfig"/>: loads the base and every source (a Hugging Face model folder, a PEFT LoRA adapter,
/// a 1-bit delta or a sparse delta, the last three densified onto the base) once, plans the output layers slice by
/// slice as mergekit's planner does (output layer j of a slice takes layer from + j of each source; gradients are read
/// at depth j / (n - 1) within the slice; the embeddings come from the first slice at depth 0, the final norm and the
/// LM head from the last at depth 1), merges every tensor by the config's method, applies LiNeS layer scaling when
/// asked, and returns the merged model. Inputs are held in memory at once (fine for the model sizes PeftSharp trains;
/// streaming per tensor is not implemented).
/// </summary>
public static class MergeRunner
{
    public static LlamaModel Run(MergeConfig config, string configDirectory, Device device)
    {
        string Resolve(string path) => Path.IsPathRooted(path) || Directory.Exists(path) ? path : Path.Combine(configDirectory, path);
        string FullPath(string p) => Path.GetFullPath(Resolve(p)).TrimEnd(Path.DirectorySeparatorChar);
        var loaded = new Dictionary<string, LlamaModel>();
        try
        {
            string? baseKey = config.BaseModel != null ? FullPath(config.BaseModel) : null;
            LlamaModel? baseModel = null;
            if (baseKey != null) loaded[baseKey] = baseModel = HuggingFaceFolder.Load(Resolve(config.BaseModel!), device);
            foreach (var entry in config.Slices.SelectMany(s => s.Sources))
            {
                if (!loaded.ContainsKey(FullPath(entry.Model))) loaded[FullPath(entry.Model)] = LoadInput(Resolve(entry.Model), baseModel, device);
            }

            var reference = baseModel ?? loaded[FullPath(config.Slices[0].Sources[0].Model)];
            foreach (var m in loaded.Values)
            {
                // Layer counts may differ (slices take ranges); every other setting must agree.
                var diff = LlamaConfig.Differences(reference.Config with { NumHiddenLayers = m.Config.NumHiddenLayers }, m.Config);
                if (diff.Count > 0) throw new PeftSharpInputException($"a merged model's config differs: {string.Join("; ", diff)}");
            }

            var plan = Plan(config, e => loaded[FullPath(e.Model)], e => baseKey != null && FullPath(e.Model) == baseKey);
            // The merged folder carries a tokenizer: tokenizer_source's folder, else the base's, else the first model's.
            string? tokenizerFolder = config.TokenizerSource is { } src && src != "base" ? Resolve(src)
                : config.BaseModel != null ? Resolve(config.BaseModel)
                : config.Slices.SelectMany(s => s.Sources).Select(e => Resolve(e.Model)).FirstOrDefault(f => File.Exists(Path.Combine(f, HuggingFaceFolder.ConfigFile)));
            int layers = plan.Sum(p => p.Length);
            var merged = LlamaModel.FromTensors(device, reference.Config with { NumHiddenLayers = layers }, (name, _) => MergeTensor(config, plan, name, layers));
            if (tokenizerFolder != null)
            {
                if (!Directory.Exists(tokenizerFolder)) throw new DirectoryNotFoundException($"tokenizer_source {tokenizerFolder} does not exist");
                merged.UseTokenizerFiles(tokenizerFolder, PeftSharp.Data.HfTokenizer.ReadFiles(tokenizerFolder));
            }

            return merged;
        }
        finally
        {
            foreach (var m in loaded.Values) m.Dispose();
        }
    }

    /// <summary>One source of a planned slice: its entry, its loaded model, its first layer, and whether it is the base.</summary>
    private sealed record PlannedSource(MergeModelEntry Entry, LlamaModel Model, int From, bool IsBase);

    /// <summary>One planned slice: its sources and the number of output layers it gives, starting at output layer Start.</summary>
    private sealed record PlannedSlice(MergeSlice Slice, IReadOnlyList<PlannedSource> Sources, int Start, int Length);

    private static List<PlannedSlice> Plan(MergeConfig config, Func<MergeModelEntry, LlamaModel> model, Func<MergeModelEntry, bool> isBase)
    {
        var plan = new List<PlannedSlice>();
        int start = 0;
        for (int s = 0; s < config.Slices.Count; s++)
        {
            var sources = new List<PlannedSource>();
            var lengths = new List<string>();
            foreach (var e in config.Slices[s].Sources)
            {
                var m = model(e);
                int n = m.Config.NumHiddenLayers, from = e.From ?? 0, to = e.To ?? n;
                if (to > n) throw new PeftSharpInputException($"slices[{s}]: {e.Model} layer_range [{from}, {to}] goes past its {n} layers");
                sources.Add(new PlannedSource(e, m, from, isBase(e)));
                lengths.Add($"{e.Model} layer_range [{from}, {to}] ({to - from} layers)");
            }

            var counts = config.Slices[s].Sources.Select((e, i) => (e.To ?? sources[i].Model.Config.NumHiddenLayers) - sources[i].From).Distinct().ToList();
            if (counts.Count != 1) throw new PeftSharpInputException($"slices[{s}]: every source of a slice must give the same number of layers: {string.Join(", ", lengths)}");
            plan.Add(new PlannedSlice(config.Slices[s], sources, start, counts[0]));
            start += counts[0];
        }

        return plan;
    }

    /// <summary>One output tensor, merged from its sources as the config's method prescribes.</summary>
    private static float[] MergeTensor(MergeConfig config, List<PlannedSlice> plan, string name, int layers)
    {
        // Where the tensor comes from: a layer of one slice, or the embeddings (first slice, depth 0) or the final
        // norm and head (last slice, depth 1), as mergekit's pre_weights and post_weights.
        PlannedSlice slice;
        double depth;
        Func<PlannedSource, string> sourceName;
        if (LayerOf(name) is int layer)
        {
            slice = plan.First(p => layer < p.Start + p.Length);
            int idx = layer - slice.Start;
            depth = slice.Length > 1 ? (double)idx / (slice.Length - 1) : 1;
            string rest = name[$"model.layers.{layer}.".Length..];
            sourceName = s => $"model.layers.{s.From + idx}.{rest}";
        }
        else
        {
            bool pre = name.StartsWith("model.embed_tokens.", StringComparison.Ordinal);
            slice = pre ? plan[0] : plan[^1];
            depth = pre ? 0 : 1;
            sourceName = _ => name;
        }

        float[] Values(PlannedSource s) => s.Model[sourceName(s)].Value.ToArray();
        double? Setting(string key) => slice.Slice.Value(key, name, depth);
        var baseSource = slice.Sources.FirstOrDefault(s => s.IsBase);
        // As mergekit does, the methods with a base skip it among the inputs (its task vector is zero); linear has none.
        var inputs = config.Method == MergeMethod.Linear ? slice.Sources : slice.Sources.Where(s => !s.IsBase).ToList();
        int rowLength = slice.Sources[0].Model[sourceName(slice.Sources[0])].Value.Shape[^1];
        switch (config.Method)
        {
            case MergeMethod.Passthrough:
                var copy = Values(slice.Sources[0]);
                if (Setting("scale") is double scale)
                {
                    for (int i = 0; i < copy.Length; i++) copy[i] = (float)(copy[i] * scale);
                }

                return copy;
            case MergeMethod.Slerp:
                double t = Setting("t") ?? throw new PeftSharpInputException($"slerp: no entry of parameters.t applies to {name} (add one without a filter)");
                return TaskVectorMerge.Slerp(Values(baseSource!), Values(inputs[0]), t);
            case MergeMethod.ModelStock:
                return TaskVectorMerge.ModelStock(Values(baseSource!), inputs.Select(Values).ToList(), config.FilterWise, rowLength);
            case MergeMethod.Karcher:
                return TaskVectorMerge.Karcher(slice.Sources.Select(Values).ToList(), (int)(Setting("max_iter") ?? 10), Setting("tol") ?? 1e-5);
            case MergeMethod.Sce:
                return TaskVectorMerge.Sce(Values(baseSource!), inputs.Select(Values).ToList(), Setting("select_topk") ?? 1.0);
            case MergeMethod.Nuslerp:
                var w = inputs.Select(s => s.Entry.Value("weight", sourceName(s), depth)
                    ?? throw new PeftSharpInputException($"nuslerp: no weight of {s.Entry.Model} applies to {sourceName(s)}")).ToArray();
                return TaskVectorMerge.Nuslerp(baseSource is { } bs ? Values(bs) : null, Values(inputs[0]), Values(inputs[1]), w[0], w[1],
                    config.NuslerpFlatten, config.NuslerpRowWise, rowLength);
        }

        if (inputs.Count == 0) throw new PeftSharpInputException($"{config.Method}: every model listed is the base_model; nothing to merge");
        var baseValues = baseSource != null ? Values(baseSource) : null;
        var values = TaskVectorMerge.Merge(config.Method, baseValues, inputs.Select(Values).ToArray(), inputs.Select(s => s.Entry.At(sourceName(s), depth)).ToArray(),
            config.Normalize, (float)(Setting("lambda") ?? 1), Seed(name), config.Rescale, rowLength);
        if (config.LinesAlpha is float alpha && config.LinesBeta is float beta && baseValues != null)
        {
            float s = TaskVectorMerge.LinesScale(LayerOf(name), layers, alpha, beta);
            for (int i = 0; i < values.Length; i++) values[i] = baseValues[i] + s * (values[i] - baseValues[i]);
        }

        return values;
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
    /// LoRA/DoRA or IA3 adapter is merged, a sparse delta added, a 1-bit delta decoded in. With <paramref name="adapters"/> or
    /// <paramref name="deltas"/> false, that kind is not looked for, so a folder of the other kind fails as not found.
    /// Returns what was applied, for the user.
    /// </summary>
    public static string ApplyFolder(LlamaModel model, string folder, bool adapters = true, bool deltas = true)
    {
        // The folder says its kind (VariantFolder); a caller that allows one kind gets an error for the other.
        IVariant variant = VariantFolder.Load(folder, model);
        if (!adapters && variant is not (BitDelta or SparseDelta)) throw new ArgumentException($"{folder} holds a {variant.Kind} adapter, not a 1-bit or sparse delta");
        if (!deltas && variant is BitDelta or SparseDelta) throw new ArgumentException($"{folder} holds a {variant.Kind}, not a PEFT adapter (merge it with --delta)");
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
