using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Model;

using PeftSharp.Variants;

namespace PeftSharp.Formats;

/// <summary>
/// A PEFT LoRA adapter folder: adapter_config.json and adapter_model.safetensors with PEFT's key names
/// (base_model.model.{module}.lora_A.weight [r, in], .lora_B.weight [out, r]). Reading checks every key against the
/// model's modules and shapes and every config option against what PeftSharp supports, and reports all offenders in
/// one error: silent mismatches are PEFT users' most reported pain.
/// </summary>
public sealed class PeftLoraAdapter : IVariant
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    private const string Prefix = "base_model.model.";

    public PeftLoraAdapter(LoraAdapterConfig config, IReadOnlyDictionary<string, (float[] A, float[] B)> modules, IReadOnlyDictionary<string, float[]>? magnitudes = null,
        IReadOnlyDictionary<string, float[]>? saved = null, IReadOnlyDictionary<string, float[]>? biases = null)
    {
        Config = config;
        Modules = modules;
        Magnitudes = magnitudes ?? new Dictionary<string, float[]>();
        Saved = saved ?? new Dictionary<string, float[]>();
        Biases = biases ?? new Dictionary<string, float[]>();
        if (config.UseDora
            && Magnitudes.Count != modules.Count) throw new ArgumentException($"a DoRA adapter needs a magnitude vector for each of its {modules.Count} modules, got {Magnitudes.Count}");
        if (config.LoraBias ? Biases.Count != modules.Count || Biases.Keys.Any(m => !modules.ContainsKey(m)) : Biases.Count > 0)
        {
            throw new ArgumentException($"lora_bias is {config.LoraBias}: the adapter needs a lora_B bias for each of its {modules.Count} modules exactly when it is true, got {Biases.Count}");
        }
    }

    /// <summary>lora_B's bias b (out) per module (lora_bias): the branch adds s (B A x + b). Empty without lora_bias.</summary>
    public IReadOnlyDictionary<string, float[]> Biases { get; }

    public LoraAdapterConfig Config { get; }

    public string Kind => Config.UseDora ? "DoRA" : Config.AloraInvocationTokens != null ? "aLoRA" : "LoRA";

    public string Summary => $"{Modules.Count} {Kind} modules (r = {Config.R}, alpha = {Config.LoraAlpha}{(Config.UseRsLora ? ", rsLoRA" : "")})";

    /// <summary>W += s B A on every module (DoRA: rescaled by m / ||W + s B A||), as <see cref="LoraMerge.Merge"/>.</summary>
    public void MergeInto(LlamaModel model) => LoraMerge.Merge(model, this);

    /// <summary>Module path (model.layers.0.self_attn.q_proj) to A (r, in) and B (out, r), row-major.</summary>
    public IReadOnlyDictionary<string, (float[] A, float[] B)> Modules { get; }

    /// <summary>DoRA's magnitude vector (out) per module; empty for plain LoRA.</summary>
    public IReadOnlyDictionary<string, float[]> Magnitudes { get; }

    /// <summary>
    /// PEFT's modules_to_save: the adapter's own full copies of whole parameters (the LM head, the embedding, norms),
    /// by Hugging Face name; they replace the base's when merged, and serve the adapter's rows in a mixed batch.
    /// </summary>
    public IReadOnlyDictionary<string, float[]> Saved { get; }

    /// <summary>
    /// The parameters a modules_to_save entry names in <paramref name="model"/>: the module whose path is the entry or
    /// ends with "." and it ("lm_head", "embed_tokens", "model.norm"), whole parameters only, never a linear layer.
    /// </summary>
    public static IReadOnlyList<string> SavedParameters(LlamaConfig model, string entry)
    {
        var linear = LoraAdapterConfig.LlamaLinearModules(model).ToHashSet();
        return LlamaModel.ParameterShapes(model).Select(s => s.Name).Where(n => n.EndsWith(".weight", StringComparison.Ordinal))
            .Where(n => n[..^".weight".Length] is var m && !linear.Contains(m) && (m == entry || m.EndsWith("." + entry, StringComparison.Ordinal))).ToList();
    }

    public static LoraAdapterConfig ParseConfig(string json, string source) =>
        InputGuard.Parse(source, () => ParseConfigCore(json, source));

    private static LoraAdapterConfig ParseConfigCore(string json, string source)
    {
        JsonObject o;
        try
        {
            o = JsonNode.Parse(json) as JsonObject ?? throw new PeftSharpInputException($"{source}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new PeftSharpInputException($"{source}: not valid JSON: {e.Message}", e);
        }

        var problems = new List<string>();
        string? peftType = o["peft_type"]?.Value<string>();
        if (peftType != "LORA") problems.Add($"peft_type is '{peftType}', this reader takes LORA");
        if (o["fan_in_fan_out"]?.Value<bool>() == true) problems.Add("fan_in_fan_out = true is for Conv1D models (GPT-2), not Llama");
        if (o["bias"]?.Value<string>() is { } bias && bias != "none") problems.Add($"bias = '{bias}' is not supported (only 'none')");

        // layers_pattern names the ModuleList that layers_to_transform indexes: "layers" is Llama's (model.layers.N).
        if (o["layers_pattern"] is JsonNode lp && lp.GetValueKind() != JsonValueKind.Null
            && !(lp is JsonValue lv && lv.Value<string>() == "layers") && !(lp is JsonArray { Count: 1 } la1 && la1[0]?.Value<string>() == "layers"))
        {
            problems.Add($"layers_pattern {lp.ToJsonString()} is not supported (a Llama's layers are model.layers: \"layers\")");
        }

        bool loraBias = o["lora_bias"] is JsonValue lb && lb.GetValueKind() == JsonValueKind.True;
        if (loraBias && o["use_dora"]?.Value<bool>() == true) problems.Add("lora_bias = true with use_dora = true (PEFT does not support the pair either)");
        // Initialisations after which PEFT's loader changes the base weights too. pissa (full SVD) and olora (QR) are
        // deterministic, so Load(folder, model) folds the base's change into the adapter; the randomized or
        // data-dependent ones would give another model here, so they are refused.
        string? initKind = null;
        if (o["init_lora_weights"] is JsonValue init && init.GetValueKind() == JsonValueKind.String && init.Value<string>() is var initName && initName != "gaussian")
        {
            if (initName is "pissa" or "olora") initKind = initName;
            else
            {
                problems.Add($"init_lora_weights '{initName}' is not supported: PEFT's loader changes the base weights for it " +
                    (initName.StartsWith("pissa_niter_", StringComparison.Ordinal) ? "by a randomized SVD that cannot be reproduced here" : "from data or a quantizer PeftSharp does not have") +
                    ", so W + s B A would be another model (pissa and olora are read exactly)");
            }
        }

        if (initKind != null && o["use_dora"]?.Value<bool>() == true) problems.Add($"init_lora_weights '{initKind}' with use_dora is not supported");

        // aLoRA: served with the positions before its invocation tokens left to the base (see LoraAdapterConfig.InvocationStart).
        List<int>? invocation = null;
        switch (o["alora_invocation_tokens"])
        {
            case null:
                break;
            case JsonArray inv when inv.Count > 0 && inv.All(t => t is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<int>(out int id) && id >= 0):
                invocation = inv.Select(t => t!.GetValue<int>()).ToList();
                if (o["use_dora"]?.Value<bool>() == true) problems.Add("alora_invocation_tokens with use_dora = true is not supported");
                if (loraBias) problems.Add("alora_invocation_tokens with lora_bias = true is not supported");
                if (o["modules_to_save"] is JsonArray { Count: > 0 })
                {
                    problems.Add("alora_invocation_tokens with modules_to_save is not supported (a whole module would change the positions before the invocation too)");
                }

                break;
            case var other:
                problems.Add($"alora_invocation_tokens is {other.ToJsonString()}, not a non-empty list of token ids");
                break;
        }

        foreach (var patterns in new[] { "rank_pattern", "alpha_pattern" })
        {
            foreach (var key in (o[patterns] as JsonObject)?.Select(p => p.Key) ?? Enumerable.Empty<string>())
            {
                if (!LoraAdapterConfig.IsPatternKey(key)) problems.Add($"{patterns} key '{key}' is not a valid regular expression");
            }
        }
        var targets = new List<string>();
        string? regex = null;
        bool IsLinearEntry(string t) => LoraAdapterConfig.LlamaLinear.Contains(t.Split('.')[^1]);
        switch (o["target_modules"])
        {
            case JsonArray arr:
                targets.AddRange(arr.Select(t => t!.Value<string>()));
                var unknown = targets.Where(t => !IsLinearEntry(t)).ToList();
                if (unknown.Count > 0) problems.Add($"target_modules [{string.Join(", ", unknown)}] name no Llama linear layer ({string.Join(", ", LoraAdapterConfig.LlamaLinear)})");
                if (targets.Count == 0) problems.Add("target_modules is an empty list (PEFT finds no module to adapt)");
                break;
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                regex = v.Value<string>();
                break;
            default:
                problems.Add("target_modules is missing");
                break;
        }

        var exclude = new List<string>();
        string? excludeRegex = null;
        switch (o["exclude_modules"])
        {
            case JsonArray ex:
                exclude.AddRange(ex.Select(t => t!.Value<string>()));
                break;
            case JsonValue ev when ev.GetValueKind() == JsonValueKind.String:
                excludeRegex = ev.Value<string>();
                break;
        }

        List<int>? layers = o["layers_to_transform"] switch
        {
            JsonArray a => a.Select(n => n!.Value<int>()).ToList(),
            JsonValue v when v.GetValueKind() == JsonValueKind.Number => new List<int> { v.Value<int>() },
            _ => null,
        };
        if (problems.Count > 0) throw new NotSupportedException($"{source}: {string.Join("; ", problems)}");
        return new LoraAdapterConfig
        {
            R = o["r"]?.Value<int>() ?? 8,
            LoraAlpha = o["lora_alpha"] is { } la ? (float)la.Value<double>() : 8,
            LoraDropout = o["lora_dropout"] is { } ld ? (float)ld.Value<double>() : 0,
            UseRsLora = o["use_rslora"]?.Value<bool>() ?? false,
            UseDora = o["use_dora"]?.Value<bool>() ?? false,
            LoraBias = loraBias,
            TargetModules = targets,
            TargetRegex = regex,
            ModulesToSave = o["modules_to_save"] is JsonArray mts ? mts.Select(t => t!.Value<string>()).ToList() : Array.Empty<string>(),
            ExcludeModules = exclude,
            ExcludeRegex = excludeRegex,
            InitLoraWeights = initKind,
            LayersToTransform = layers,
            RankPattern = (o["rank_pattern"] as JsonObject)?.ToDictionary(p => p.Key, p => p.Value!.Value<int>()) ?? new Dictionary<string, int>(),
            AlphaPattern = (o["alpha_pattern"] as JsonObject)?.ToDictionary(p => p.Key, p => (float)p.Value!.Value<double>()) ?? new Dictionary<string, float>(),
            BaseModelNameOrPath = o["base_model_name_or_path"]?.Value<string>(),
            TaskType = o["task_type"]?.Value<string>() ?? "CAUSAL_LM",
            AloraInvocationTokens = invocation,
        };
    }

    /// <summary>Reads a PEFT folder for a model with <paramref name="model"/>'s configuration.</summary>
    public static PeftLoraAdapter Load(string folder, LlamaConfig model) => InputGuard.Parse(folder, () =>
    {
        var adapter = LoadCore(folder, model);
        return adapter.Config.InitLoraWeights is not string init ? adapter
            : throw new NotSupportedException($"{Path.Combine(folder, ConfigFile)}: init_lora_weights '{init}' changes the base weights when PEFT loads it; " +
                "read it with PeftLoraAdapter.Load(folder, model), which has the base's weights to fold that change in");
    });

    /// <summary>
    /// Reads a PEFT folder for <paramref name="model"/> (as <see cref="PeftSharp.Compression.BitDelta.Load"/> and the other
    /// variant loaders take it). A pissa or olora adapter comes back as the plain LoRA of twice the rank that computes
    /// what PEFT's loader does (it subtracts the adapter's starting product from <paramref name="model"/>'s weights):
    /// see <see cref="BaseChangeFolding"/>.
    /// </summary>
    public static PeftLoraAdapter Load(string folder, LlamaModel model) => InputGuard.Parse(folder, () =>
    {
        var adapter = LoadCore(folder, model.Config);
        return adapter.Config.InitLoraWeights == null ? adapter : BaseChangeFolding.Fold(adapter, model, Path.Combine(folder, ConfigFile));
    });

    private static PeftLoraAdapter LoadCore(string folder, LlamaConfig model)
    {
        string configPath = Path.Combine(folder, ConfigFile);
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{folder}: no {ConfigFile}; is this a PEFT adapter folder?", configPath);
        var config = ParseConfig(File.ReadAllText(configPath), configPath);
        string weights = Path.Combine(folder, WeightsFile);
        if (!File.Exists(weights)) throw new FileNotFoundException($"{folder}: no {WeightsFile} (adapter_model.bin is not read: pickle files can run code)", weights);
        using var file = SafeTensorsFile.Open(weights);
        var targets = config.TargetsIn(model).ToList();
        var problems = new List<string>();
        if (config.AloraInvocationTokens?.Where(t => t >= model.VocabSize).ToList() is { Count: > 0 } outside)
        {
            problems.Add($"alora_invocation_tokens [{string.Join(", ", outside)}] are outside the model's vocabulary of {model.VocabSize}");
        }

        var modules = new Dictionary<string, (float[], float[])>();
        var magnitudes = new Dictionary<string, float[]>();
        var biases = new Dictionary<string, float[]>();
        var used = new HashSet<string>();
        foreach (var module in targets)
        {
            var (r, _) = config.For(module);
            var (outF, inF) = LinearShape(model, module);
            string ka = $"{Prefix}{module}.lora_A.weight", kb = $"{Prefix}{module}.lora_B.weight";
            used.Add(ka);
            used.Add(kb);
            var a = file.ReadFloats(ka, new long[] { r, inF }, problems);
            var b = file.ReadFloats(kb, new long[] { outF, r }, problems);
            if (a != null && b != null) modules[module] = (a, b);
            // (out) vectors beside A and B: lora_B's bias under lora_bias, DoRA's magnitude under use_dora.
            foreach (var (on, key, why, into) in new[]
            {
                (config.LoraBias, $"{Prefix}{module}.lora_B.bias", "lora_bias", biases), (config.UseDora, $"{Prefix}{module}.lora_magnitude_vector", "use_dora", magnitudes),
            })
            {
                if (!on) continue;
                used.Add(key);
                if (file.ReadFloats(key, new long[] { outF }, problems, $"{why} is true") is { } values) into[module] = values;
            }
        }

        // modules_to_save: whole copies, under the module's own key (PEFT strips "modules_to_save.<adapter>" when saving).
        var saved = new Dictionary<string, float[]>();
        var shapes = LlamaModel.ParameterShapes(model).ToDictionary(s => s.Name, s => s.Shape);
        foreach (var entry in config.ModulesToSave)
        {
            var parameters = SavedParameters(model, entry);
            if (model.TieWordEmbeddings && (entry.Split('.')[^1] is "lm_head" or "embed_tokens"))
            {
                throw new NotSupportedException($"{folder}: modules_to_save '{entry}' with tied word embeddings: PEFT's copy unties the embedding and the LM head, which this model shares");
            }

            if (parameters.Count == 0) problems.Add($"modules_to_save '{entry}' names no whole parameter of this model (the LM head, the embedding, a norm)");

            foreach (var p in parameters)
            {
                string key = Prefix + p;
                used.Add(key);
                if (file.ReadFloats(key, shapes[p].Select(d => (long)d).ToArray(), problems, $"modules_to_save '{entry}'") is { } values) saved[p] = values;
            }
        }

        foreach (var t in file.Tensors.Where(t => !used.Contains(t.Name)))
        {
            problems.Add($"{t.Name} matches no targeted module of this model");
        }

        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the adapter does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        return new PeftLoraAdapter(config, modules, magnitudes, saved, biases);
    }

    /// <summary>(out, in) of a Llama linear module path.</summary>
    public static (int Out, int In) LinearShape(LlamaConfig c, string module)
    {
        int q = c.NumAttentionHeads * c.HeadDim, kv = c.NumKeyValueHeads * c.HeadDim;
        string leaf = module[(module.LastIndexOf('.') + 1)..];
        return leaf switch
        {
            "q_proj" => (q, c.HiddenSize),
            "k_proj" or "v_proj" => (kv, c.HiddenSize),
            "o_proj" => (c.HiddenSize, q),
            "gate_proj" or "up_proj" => (c.IntermediateSize, c.HiddenSize),
            "down_proj" => (c.HiddenSize, c.IntermediateSize),
            _ => throw new ArgumentException($"'{module}' is not a Llama linear module"),
        };
    }

    /// <summary>Writes adapter_config.json and adapter_model.safetensors as PEFT does (each file atomically).</summary>
    public void Save(string folder, LlamaConfig model)
    {
        Directory.CreateDirectory(folder);
        var tensors = new List<SafeTensorData>();
        foreach (var (module, (a, b)) in Modules.OrderBy(m => m.Key, StringComparer.Ordinal))
        {
            var (r, _) = Config.For(module);
            var (outF, inF) = LinearShape(model, module);
            tensors.Add(new SafeTensorData($"{Prefix}{module}.lora_A.weight", a, new[] { r, inF }));
            tensors.Add(new SafeTensorData($"{Prefix}{module}.lora_B.weight", b, new[] { outF, r }));
            if (Magnitudes.TryGetValue(module, out var m)) tensors.Add(new SafeTensorData($"{Prefix}{module}.lora_magnitude_vector", m, new[] { outF }));
            if (Biases.TryGetValue(module, out var bias)) tensors.Add(new SafeTensorData($"{Prefix}{module}.lora_B.bias", bias, new[] { outF }));
        }

        var shapes = LlamaModel.ParameterShapes(model).ToDictionary(s => s.Name, s => s.Shape);
        foreach (var (parameter, values) in Saved.OrderBy(p => p.Key, StringComparer.Ordinal)) tensors.Add(new SafeTensorData(Prefix + parameter, values, shapes[parameter]));
        SafeTensorsWriter.Write(Path.Combine(folder, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var o = new JsonObject
        {
            ["peft_type"] = "LORA",
            ["task_type"] = Config.TaskType,
            ["r"] = Config.R,
            ["lora_alpha"] = Config.LoraAlpha,
            ["lora_dropout"] = Config.LoraDropout,
            ["use_rslora"] = Config.UseRsLora,
            ["use_dora"] = Config.UseDora,
            ["lora_bias"] = Config.LoraBias,
            ["fan_in_fan_out"] = false,
            ["bias"] = "none",
            ["target_modules"] = Config.TargetRegex != null ? JsonValue.Create(Config.TargetRegex)
                : Config.TargetModules.Count == 0 ? JsonValue.Create("all-linear") // no targets named means every linear layer
                : new JsonArray(Config.TargetModules.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray()),
            ["rank_pattern"] = new JsonObject(Config.RankPattern.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)p.Value))),
            ["alpha_pattern"] = new JsonObject(Config.AlphaPattern.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)p.Value))),
            ["base_model_name_or_path"] = Config.BaseModelNameOrPath,
            ["modules_to_save"] = Config.ModulesToSave.Count > 0 ? new JsonArray(Config.ModulesToSave.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray()) : null,
            ["inference_mode"] = true,
        };
        if (Config.ExcludeModules.Count > 0) o["exclude_modules"] = new JsonArray(Config.ExcludeModules.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray());
        if (Config.ExcludeRegex != null) o["exclude_modules"] = Config.ExcludeRegex;
        if (Config.InitLoraWeights != null) o["init_lora_weights"] = Config.InitLoraWeights;
        if (Config.AloraInvocationTokens != null) o["alora_invocation_tokens"] = new JsonArray(Config.AloraInvocationTokens.Select(t => (JsonNode)t).ToArray());
        if (Config.LayersToTransform != null) o["layers_to_transform"] = new JsonArray(Config.LayersToTransform.Select(i => (JsonNode)i).ToArray());
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
