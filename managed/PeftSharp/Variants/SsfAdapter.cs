using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Adapters;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Variants;

/// <summary>
/// An SSF adapter folder (PeftSharp's own format; PEFT has none): ssf_config.json naming the modules, and
/// ssf.safetensors holding `{module}.ssf_scale` and `{module}.ssf_shift`, each [out]. A row served in the mixed batch
/// scales its outputs and adds its shift as its own bias; merging scales W's rows and folds the shift into the
/// module's bias, which a module without one (Llama's) cannot take unless the shift is zero: refused by name then.
/// </summary>
public sealed class SsfAdapter : IVariant
{
    public const string ConfigFile = "ssf_config.json";
    public const string WeightsFile = "ssf.safetensors";

    public SsfAdapter(IReadOnlyDictionary<string, (float[] Scale, float[] Shift)> modules)
    {
        Modules = modules;
    }

    /// <summary>gamma and beta (out) per linear module path.</summary>
    public IReadOnlyDictionary<string, (float[] Scale, float[] Shift)> Modules { get; }

    public string Kind => "SSF";

    public string Summary => $"SSF on {Modules.Count} modules";

    /// <summary>The bias of <paramref name="module"/> after SSF: gamma * b + beta, for its bias b (zeros where it has none).</summary>
    public float[] RowBias(string module, float[] b)
    {
        var (scale, shift) = Modules[module];
        return b.Select((v, i) => scale[i] * v + shift[i]).ToArray();
    }

    public void MergeInto(LlamaModel model)
    {
        var bare = Modules.Where(m => !model.Has(m.Key + ".bias") && m.Value.Shift.Any(v => v != 0f)).Select(m => m.Key).ToList();
        if (bare.Count > 0)
        {
            throw new NotSupportedException($"SSF shift on {string.Join(", ", bare)}: {(bare.Count == 1 ? "the module has" : "the modules have")} no bias to merge it into; " +
                "serve the adapter unmerged (eval or generate), where each row adds its shift");
        }

        foreach (var (module, (scale, _)) in Modules)
        {
            if (model.Has(module + ".bias")) model[module + ".bias"].Value.CopyFrom(RowBias(module, model[module + ".bias"].Value.ToArray()));
            Ia3Layer.ScaleWeight(model[module + ".weight"].Value, scale, feedForward: false);
        }
    }

    public void Save(string folder, LlamaConfig config)
    {
        Directory.CreateDirectory(folder);
        var tensors = Modules.OrderBy(m => m.Key, StringComparer.Ordinal).SelectMany(m => new[]
        {
            new SafeTensorData(m.Key + ".ssf_scale", m.Value.Scale, new[] { m.Value.Scale.Length }),
            new SafeTensorData(m.Key + ".ssf_shift", m.Value.Shift, new[] { m.Value.Shift.Length }),
        }).ToList();
        SafeTensorsWriter.Write(Path.Combine(folder, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "peftsharp-ssf" });
        var o = new JsonObject { ["method"] = "ssf", ["modules"] = JsonConfigFile.SortedNames(Modules.Keys) };
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads an SSF folder for <paramref name="model"/>: module names and shapes checked, every problem named.</summary>
    public static SsfAdapter Load(string folder, LlamaConfig model) => InputGuard.Parse(folder, () =>
    {
        var o = JsonConfigFile.Read(folder, ConfigFile, "SSF adapter");
        var names = (o["modules"] as JsonArray)?.Select(n => n?.Value<string>() ?? "").ToList()
            ?? throw new PeftSharpInputException($"{Path.Combine(folder, ConfigFile)}: no modules list");
        var linear = LoraAdapterConfig.LlamaLinearModules(model).ToHashSet();
        using var file = SafeTensorsFile.Open(Path.Combine(folder, WeightsFile));
        var problems = new List<string>();
        var modules = new Dictionary<string, (float[], float[])>();
        foreach (var module in names)
        {
            if (!linear.Contains(module))
            {
                problems.Add($"{module} is not a linear module of this model");
                continue;
            }

            int outF = PeftLoraAdapter.LinearShape(model, module).Out;
            var scale = file.ReadFloats(module + ".ssf_scale", new long[] { outF }, problems);
            var shift = file.ReadFloats(module + ".ssf_shift", new long[] { outF }, problems);
            if (scale != null && shift != null) modules[module] = (scale, shift);
        }

        foreach (var t in file.Tensors.Where(t => !names.Any(m => t.Name == m + ".ssf_scale" || t.Name == m + ".ssf_shift"))) problems.Add($"{t.Name} belongs to no listed module");
        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the SSF adapter does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        return new SsfAdapter(modules);
    });
}
