using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using PeftSharp.Adapters;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Formats;

/// <summary>
/// A PEFT IA3 folder (peft_type IA3): adapter_config.json and adapter_model.safetensors holding one vector per
/// targeted module under `base_model.model.{module}.ia3_l`, [out, 1] scaling the module's output, or [1, in] scaling
/// the input of a feedforward module. Targets and feedforward modules are matched as PEFT's IA3 model does: a target
/// list by module-path suffix (or a regex over the whole path), the feedforward list by string suffix (or a regex);
/// PEFT's Llama defaults are k_proj, v_proj and down_proj, down_proj feedforward.
/// </summary>
public sealed class PeftIa3Adapter : IVariant
{
    public const string PeftTypeName = "IA3";
    private const string Prefix = "base_model.model.";

    /// <summary>PEFT's Llama defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and its feedforward twin).</summary>
    public static readonly IReadOnlyList<string> DefaultTargets = new[] { "k_proj", "v_proj", "down_proj" };

    public static readonly IReadOnlyList<string> DefaultFeedForward = new[] { "down_proj" };

    public PeftIa3Adapter(Ia3Config config, IReadOnlyDictionary<string, float[]> vectors)
    {
        Config = config;
        Vectors = vectors;
    }

    public Ia3Config Config { get; }

    /// <summary>l per targeted module: (out), or (in) for a feedforward module.</summary>
    public IReadOnlyDictionary<string, float[]> Vectors { get; }

    public string Kind => "IA3";

    public string Summary => $"{Vectors.Count} IA3 vectors ({Vectors.Keys.Count(Config.IsFeedForward)} on feedforward inputs)";

    /// <summary>
    /// W's rows times l (output form; a module's bias too, as PEFT merges it), or its columns times l (feedforward).
    /// </summary>
    public void MergeInto(LlamaModel model)
    {
        foreach (var (module, l) in Vectors)
        {
            bool ff = Config.IsFeedForward(module);
            Ia3Layer.ScaleWeight(model[module + ".weight"].Value, l, ff);
            if (!ff && model.Has(module + ".bias"))
            {
                var bias = model[module + ".bias"].Value;
                bias.CopyFrom(bias.ToArray().Select((b, i) => b * l[i]).ToArray());
            }
        }
    }

    /// <summary>The vector's shape in the file: [out, 1], or [1, in] for a feedforward module.</summary>
    public static int[] FileShape(LlamaConfig model, string module, bool feedForward)
    {
        var (outF, inF) = PeftLoraAdapter.LinearShape(model, module);
        return feedForward ? new[] { 1, inF } : new[] { outF, 1 };
    }

    public void Save(string folder, LlamaConfig model)
    {
        Directory.CreateDirectory(folder);
        var tensors = Vectors.OrderBy(v => v.Key, StringComparer.Ordinal)
            .Select(v => new SafeTensorData($"{Prefix}{v.Key}.ia3_l", v.Value, FileShape(model, v.Key, Config.IsFeedForward(v.Key)))).ToList();
        SafeTensorsWriter.Write(Path.Combine(folder, PeftLoraAdapter.WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        JsonNode List(IReadOnlyList<string> entries, string? regex) =>
            regex != null ? JsonValue.Create(regex) : new JsonArray(entries.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray());
        var o = new JsonObject
        {
            ["peft_type"] = PeftTypeName,
            ["task_type"] = "CAUSAL_LM",
            ["target_modules"] = List(Config.TargetModules, Config.TargetRegex),
            ["feedforward_modules"] = List(Config.FeedForwardModules, Config.FeedForwardRegex),
            ["fan_in_fan_out"] = false,
            ["init_ia3_weights"] = true,
            ["modules_to_save"] = null,
            ["inference_mode"] = true,
            ["base_model_name_or_path"] = Config.BaseModelNameOrPath,
        };
        AtomicFile.WriteText(Path.Combine(folder, PeftLoraAdapter.ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads adapter_config.json's IA3 settings; every unsupported option is named in one error.</summary>
    public static Ia3Config ParseConfig(JsonObject o, string source)
    {
        var problems = new List<string>();
        if (o["peft_type"]?.Value<string>() != PeftTypeName) problems.Add($"peft_type is '{o["peft_type"]}', this reader takes {PeftTypeName}");
        if (o["fan_in_fan_out"]?.Value<bool>() == true) problems.Add("fan_in_fan_out = true is for Conv1D models (GPT-2), not Llama");
        foreach (var key in new[] { "modules_to_save", "layers_to_transform", "exclude_modules" })
        {
            if (o[key] is JsonNode n && n.GetValueKind() != JsonValueKind.Null && !(n is JsonArray { Count: 0 })) problems.Add($"{key} is not supported for IA3");
        }

        (IReadOnlyList<string> List, string? Regex) Read(string key, IReadOnlyList<string> fallback)
        {
            switch (o[key])
            {
                case JsonArray a:
                    var entries = a.Select(t => t?.Value<string>() ?? "").ToList();
                    var unknown = entries.Where(t => !LoraAdapterConfig.LlamaLinear.Contains(t.Split('.')[^1])).ToList();
                    if (unknown.Count > 0) problems.Add($"{key} [{string.Join(", ", unknown)}] name no Llama linear layer ({string.Join(", ", LoraAdapterConfig.LlamaLinear)})");
                    return (entries, null);
                case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                    string rx = v.Value<string>()!;
                    if (!LoraAdapterConfig.IsPatternKey(rx)) problems.Add($"{key} '{rx}' is not a valid regular expression");
                    return (Array.Empty<string>(), rx);
                default:
                    return (fallback, null); // null: PEFT's defaults for Llama
            }
        }

        var (targets, targetRegex) = Read("target_modules", DefaultTargets);
        var (ff, ffRegex) = Read("feedforward_modules", DefaultFeedForward);
        if (problems.Count > 0) throw new NotSupportedException($"{source}: {string.Join("; ", problems)}");
        return new Ia3Config
        {
            TargetModules = targets, TargetRegex = targetRegex, FeedForwardModules = ff, FeedForwardRegex = ffRegex,
            BaseModelNameOrPath = o["base_model_name_or_path"]?.Value<string>(),
        };
    }

    /// <summary>Reads a PEFT IA3 folder for a model with <paramref name="model"/>'s configuration; every mismatch is named in one error.</summary>
    public static PeftIa3Adapter Load(string folder, LlamaConfig model) => InputGuard.Parse(folder, () =>
    {
        string configPath = Path.Combine(folder, PeftLoraAdapter.ConfigFile);
        var config = ParseConfig(JsonConfigFile.Read(folder, PeftLoraAdapter.ConfigFile, "PEFT adapter"), configPath);
        var targets = config.TargetsIn(model).ToList();
        var notTargeted = LoraAdapterConfig.LlamaLinearModules(model).Where(m => config.IsFeedForward(m) && !targets.Contains(m)).ToList();
        string weights = Path.Combine(folder, PeftLoraAdapter.WeightsFile);
        if (!File.Exists(weights)) throw new FileNotFoundException($"{folder}: no {PeftLoraAdapter.WeightsFile} (adapter_model.bin is not read: pickle files can run code)", weights);
        using var file = SafeTensorsFile.Open(weights);
        var problems = new List<string>();
        if (notTargeted.Count > 0) problems.Add($"feedforward_modules must be a subset of target_modules (as PEFT requires): {notTargeted[0]} is not targeted");
        if (targets.Count == 0) problems.Add("target_modules match no module of this model");
        var vectors = new Dictionary<string, float[]>();
        var used = new HashSet<string>();
        foreach (var module in targets)
        {
            string key = $"{Prefix}{module}.ia3_l";
            used.Add(key);
            if (file.ReadFloats(key, FileShape(model, module, config.IsFeedForward(module)).Select(d => (long)d).ToArray(), problems) is { } values) vectors[module] = values;
        }

        foreach (var t in file.Tensors.Where(t => !used.Contains(t.Name))) problems.Add($"{t.Name} matches no targeted module of this model");
        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the IA3 adapter does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        return new PeftIa3Adapter(config, vectors);
    });
}

/// <summary>PEFT's IA3Config as PeftSharp reads and writes it: targets and feedforward modules (lists or regexes).</summary>
public sealed record Ia3Config
{
    /// <summary>Target list (module names or path suffixes); PEFT's Llama default when neither form is given.</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = PeftIa3Adapter.DefaultTargets;

    /// <summary>A regex over the whole module path, instead of the list.</summary>
    public string? TargetRegex { get; init; }

    public IReadOnlyList<string> FeedForwardModules { get; init; } = PeftIa3Adapter.DefaultFeedForward;

    public string? FeedForwardRegex { get; init; }

    public string? BaseModelNameOrPath { get; init; }

    /// <summary>The module paths of <paramref name="model"/> targeted (PEFT's check_target_module_exists).</summary>
    public IEnumerable<string> TargetsIn(LlamaConfig model) =>
        new LoraAdapterConfig { TargetModules = TargetModules, TargetRegex = TargetRegex }.TargetsIn(model);

    /// <summary>PEFT's _check_target_module_feedforward: a regex over the whole path, or any entry the path ends with.</summary>
    public bool IsFeedForward(string module) =>
        FeedForwardRegex is { } rx ? Regex.IsMatch(module, "^(?:" + rx + ")$") : FeedForwardModules.Any(f => module.EndsWith(f, StringComparison.Ordinal));
}
