using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Formats;

/// <summary>
/// A PEFT LN tuning folder (peft_type LN_TUNING, Zhao et al. 2023): the trained copies of chosen norm layers, under
/// `base_model.model.{module}.ln_tuning_layers.weight` (PEFT's key with the adapter name removed), each the norm's
/// whole weight. Targets are matched as PEFT does (a list by module-path suffix, or a regex over the path); PEFT's
/// Llama default is input_layernorm, post_attention_layernorm and norm (the final norm). Merging replaces the norm
/// weights; served in a mixed batch, each row uses its variant's norms (replacements).
/// </summary>
public sealed class PeftLnTuningAdapter : IVariant
{
    public const string PeftTypeName = "LN_TUNING";
    private const string Prefix = "base_model.model.";

    /// <summary>PEFT's Llama default (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).</summary>
    public static readonly IReadOnlyList<string> DefaultTargets = new[] { "input_layernorm", "post_attention_layernorm", "norm" };

    public PeftLnTuningAdapter(IReadOnlyList<string> targetModules, string? targetRegex, IReadOnlyDictionary<string, float[]> norms, string? baseModel = null)
    {
        TargetModules = targetModules;
        TargetRegex = targetRegex;
        Norms = norms;
        BaseModelNameOrPath = baseModel;
    }

    public IReadOnlyList<string> TargetModules { get; }

    public string? TargetRegex { get; }

    /// <summary>The tuned norm weights by parameter name (model.layers.0.input_layernorm.weight).</summary>
    public IReadOnlyDictionary<string, float[]> Norms { get; }

    public string? BaseModelNameOrPath { get; }

    public string Kind => "LN tuning";

    public string Summary => $"{Norms.Count} tuned norm weights";

    /// <summary>The norm modules of <paramref name="model"/> (their paths, without .weight) that the targets name, in the model's order.</summary>
    public static IEnumerable<string> TargetsIn(LlamaConfig model, IReadOnlyList<string> targets, string? regex) =>
        LlamaModel.ParameterShapes(model).Select(s => s.Name).Where(n => n.EndsWith("norm.weight", StringComparison.Ordinal)).Select(n => n[..^".weight".Length])
            .Where(m => regex != null ? Regex.IsMatch(m, "^(?:" + regex + ")$") : LoraAdapterConfig.ListMatches(targets, m));

    public void MergeInto(LlamaModel model)
    {
        foreach (var (parameter, values) in Norms) model[parameter].Value.CopyFrom(values);
    }

    public void Save(string folder, LlamaConfig model)
    {
        Directory.CreateDirectory(folder);
        var tensors = Norms.OrderBy(n => n.Key, StringComparer.Ordinal)
            .Select(n => new SafeTensorData($"{Prefix}{n.Key[..^".weight".Length]}.ln_tuning_layers.weight", n.Value, new[] { n.Value.Length })).ToList();
        SafeTensorsWriter.Write(Path.Combine(folder, PeftLoraAdapter.WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var o = new JsonObject
        {
            ["peft_type"] = PeftTypeName,
            ["task_type"] = "CAUSAL_LM",
            ["target_modules"] = TargetRegex != null ? JsonValue.Create(TargetRegex) : new JsonArray(TargetModules.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray()),
            ["modules_to_save"] = null,
            ["inference_mode"] = true,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
        };
        AtomicFile.WriteText(Path.Combine(folder, PeftLoraAdapter.ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads a PEFT LN tuning folder for <paramref name="model"/>; every mismatch is named in one error.</summary>
    public static PeftLnTuningAdapter Load(string folder, LlamaConfig model) => InputGuard.Parse(folder, () =>
    {
        var o = JsonConfigFile.Read(folder, PeftLoraAdapter.ConfigFile, "PEFT adapter");
        string configPath = Path.Combine(folder, PeftLoraAdapter.ConfigFile);
        var problems = new List<string>();
        if (o["peft_type"]?.Value<string>() != PeftTypeName) problems.Add($"peft_type is '{o["peft_type"]}', this reader takes {PeftTypeName}");
        foreach (var key in new[] { "modules_to_save", "exclude_modules" })
        {
            if (o[key] is JsonNode n && n.GetValueKind() != JsonValueKind.Null && !(n is JsonArray { Count: 0 })) problems.Add($"{key} is not supported for LN tuning");
        }

        IReadOnlyList<string> targets = DefaultTargets;
        string? regex = null;
        switch (o["target_modules"])
        {
            case JsonArray a:
                targets = a.Select(t => t?.Value<string>() ?? "").ToList();
                break;
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                regex = v.Value<string>();
                if (!LoraAdapterConfig.IsPatternKey(regex!)) problems.Add($"target_modules '{regex}' is not a valid regular expression");
                break;
        }

        if (problems.Count > 0) throw new NotSupportedException($"{configPath}: {string.Join("; ", problems)}");
        string weights = Path.Combine(folder, PeftLoraAdapter.WeightsFile);
        if (!File.Exists(weights)) throw new FileNotFoundException($"{folder}: no {PeftLoraAdapter.WeightsFile} (adapter_model.bin is not read: pickle files can run code)", weights);
        using var file = SafeTensorsFile.Open(weights);
        var shapes = LlamaModel.ParameterShapes(model).ToDictionary(s => s.Name, s => s.Shape);
        var modules = TargetsIn(model, targets, regex).ToList();
        if (modules.Count == 0) problems.Add($"target_modules {(regex ?? string.Join(", ", targets))} name no norm layer of this model");
        var norms = new Dictionary<string, float[]>();
        var used = new HashSet<string>();
        foreach (var module in modules)
        {
            string key = $"{Prefix}{module}.ln_tuning_layers.weight";
            used.Add(key);
            if (file.ReadFloats(key, shapes[module + ".weight"].Select(d => (long)d).ToArray(), problems) is { } values) norms[module + ".weight"] = values;
        }

        foreach (var t in file.Tensors.Where(t => !used.Contains(t.Name))) problems.Add($"{t.Name} matches no targeted norm of this model");
        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the LN tuning adapter does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        return new PeftLnTuningAdapter(targets, regex, norms, o["base_model_name_or_path"]?.Value<string>());
    });
}
