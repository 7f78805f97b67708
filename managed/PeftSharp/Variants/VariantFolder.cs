using System.Text.Json.Nodes;
using PeftSharp.Compression;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Variants;

/// <summary>The one place that tells variant folders apart, by the config file each kind writes.</summary>
public static class VariantFolder
{
    /// <summary>Whether <paramref name="folder"/> holds a variant (an adapter or a delta) rather than a model.</summary>
    public static bool IsVariant(string folder) =>
        new[] { PeftLoraAdapter.ConfigFile, BitDelta.ConfigFile, SparseDelta.ConfigFile, SsfAdapter.ConfigFile }.Any(f => File.Exists(Path.Combine(folder, f)));

    /// <summary>
    /// Reads the variant in <paramref name="folder"/> for <paramref name="model"/>: adapter_config.json is a PEFT
    /// adapter (LoRA / DoRA, or PREFIX_TUNING, IA3 or LN_TUNING by its peft_type), sparse_config.json a sparse delta,
    /// bitdelta_config.json a 1-bit delta (both checked against the model's fingerprint). Anything else is an error
    /// naming the folder and what was looked for.
    /// </summary>
    public static IVariant Load(string folder, LlamaModel model)
    {
        if (File.Exists(Path.Combine(folder, PeftLoraAdapter.ConfigFile)))
        {
            var type = JsonConfigFile.Read(folder, PeftLoraAdapter.ConfigFile, "PEFT adapter")["peft_type"];
            string? kind = type is JsonValue v && v.TryGetValue(out string? s) ? s : null;
            return kind switch
            {
                "PREFIX_TUNING" => PeftPrefixAdapter.Load(folder, model.Config),
                PeftIa3Adapter.PeftTypeName => PeftIa3Adapter.Load(folder, model.Config),
                PeftLnTuningAdapter.PeftTypeName => PeftLnTuningAdapter.Load(folder, model.Config),
                _ => PeftLoraAdapter.Load(folder, model),
            };
        }

        if (File.Exists(Path.Combine(folder, SparseDelta.ConfigFile))) return SparseDelta.Load(folder, model);
        if (File.Exists(Path.Combine(folder, SsfAdapter.ConfigFile))) return SsfAdapter.Load(folder, model.Config);
        if (File.Exists(Path.Combine(folder, BitDelta.ConfigFile))) return BitDelta.Load(folder, model);
        throw new FileNotFoundException($"{folder}: not a variant folder (no {PeftLoraAdapter.ConfigFile}, {SparseDelta.ConfigFile}, {BitDelta.ConfigFile} or {SsfAdapter.ConfigFile})", folder);
    }
}
