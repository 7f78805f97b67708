using PeftSharp.Formats;
using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Kernels.Core;

namespace PeftSharp.Model;

/// <summary>
/// A Llama-family decoder's configuration, mirroring Hugging Face's config.json field names (LlamaConfig).
/// </summary>
public sealed record LlamaConfig
{
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int NumAttentionHeads { get; init; }
    public int NumKeyValueHeads { get; init; }
    public int NumHiddenLayers { get; init; }
    public int VocabSize { get; init; }
    public float RmsNormEps { get; init; } = 1e-6f;
    public float RopeTheta { get; init; } = 10000f;
    public int MaxPositionEmbeddings { get; init; } = 2048;
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Per-head dimension; defaults to hidden_size / num_attention_heads when config.json omits it.</summary>
    public int? HeadDimOverride { get; init; }

    /// <summary>config.json's rope_scaling: none, linear or llama3 (Llama 3.1 and later); other types are refused.</summary>
    public RopeScaling RopeScaling { get; init; }

    public int HeadDim => HeadDimOverride ?? HiddenSize / Math.Max(1, NumAttentionHeads);

    /// <summary>
    /// Qwen3's per-head RMSNorm of queries and keys (self_attn.q_norm / k_norm, weights (D)) after their projections
    /// and before RoPE; the rest of the graph is Llama's.
    /// </summary>
    public bool QkNorm { get; init; }

    /// <summary>
    /// Qwen2's biases on the q, k and v projections (self_attn.{q,k,v}_proj.bias, (out)), added after each product and
    /// after any adapter's delta; o_proj and the MLP have none. The rest of the graph is Llama's.
    /// </summary>
    public bool QkvBias { get; init; }

    /// <summary>
    /// MistralForCausalLM: Llama's graph, read and written under Mistral's names, with <see cref="SlidingWindow"/>.
    /// </summary>
    public bool Mistral { get; init; }

    /// <summary>
    /// Mistral's sliding_window (null: none, as Mistral 7B v0.2 and later ship it): in every layer, position p attends
    /// to positions p - W &lt; j &lt;= p, as transformers masks it, in training, prefill and decode over the KV cache.
    /// </summary>
    public int? SlidingWindow { get; init; }

    /// <summary>The longest sequence this config runs: max_position_embeddings.</summary>
    public int ContextLimit => MaxPositionEmbeddings;

    /// <summary>What <see cref="ContextLimit"/> is, for errors.</summary>
    public string ContextLimitText => $"max_position_embeddings = {MaxPositionEmbeddings}";

    /// <summary>The sliding window for the attention kernels (0: none).</summary>
    internal int AttentionWindow => SlidingWindow ?? 0;

    /// <summary>
    /// The architectures PeftSharp runs: LlamaForCausalLM, Qwen2ForCausalLM (Llama plus q/k/v biases), Qwen3ForCausalLM
    /// (Llama plus q/k norms), MistralForCausalLM (Llama with a sliding window).
    /// </summary>
    public static readonly string[] SupportedArchitectures = { "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM" };

    private static readonly string[] SupportedModelTypes = { "llama", "qwen2", "qwen3", "mistral" };

    /// <summary>A tiny model for tests and the quickstart: byte vocabulary, 2 layers.</summary>
    public static LlamaConfig Tiny => new()
    {
        HiddenSize = 64, IntermediateSize = 172, NumAttentionHeads = 4, NumKeyValueHeads = 2, NumHiddenLayers = 2,
        VocabSize = 259, RmsNormEps = 1e-5f, RopeTheta = 10000f, MaxPositionEmbeddings = 512, TieWordEmbeddings = true,
    };

    /// <summary>Checks the dimensions fit together; errors name the fields.</summary>
    public void Validate(string source = "config")
    {
        var errors = new List<string>();
        void Positive(string name, int v)
        {
            if (v <= 0) errors.Add($"{name} = {v} must be positive");
        }

        Positive("hidden_size", HiddenSize);
        Positive("intermediate_size", IntermediateSize);
        Positive("num_attention_heads", NumAttentionHeads);
        Positive("num_key_value_heads", NumKeyValueHeads);
        Positive("num_hidden_layers", NumHiddenLayers);
        Positive("vocab_size", VocabSize);
        if (NumKeyValueHeads > 0 && NumAttentionHeads % NumKeyValueHeads != 0)
        {
            errors.Add($"num_attention_heads = {NumAttentionHeads} is not a multiple of num_key_value_heads = {NumKeyValueHeads}");
        }

        if (HeadDimOverride == null && NumAttentionHeads > 0 && HiddenSize % NumAttentionHeads != 0)
        {
            errors.Add($"hidden_size = {HiddenSize} is not a multiple of num_attention_heads = {NumAttentionHeads} and head_dim is not given");
        }

        if (HeadDim % 2 != 0) errors.Add($"head_dim = {HeadDim} must be even for rotary embeddings");
        if (HeadDimOverride is <= 0) errors.Add($"head_dim = {HeadDimOverride} must be positive");
        Positive("max_position_embeddings", MaxPositionEmbeddings);
        if (SlidingWindow is <= 0) errors.Add($"sliding_window = {SlidingWindow} must be positive (or null for none)");
        if (!(RmsNormEps >= 0) || float.IsInfinity(RmsNormEps)) errors.Add($"rms_norm_eps = {RmsNormEps} must be finite and >= 0");
        if (!(RopeTheta > 1) || float.IsInfinity(RopeTheta)) errors.Add($"rope_theta = {RopeTheta} must be finite and > 1");
        var rs = RopeScaling;
        if (rs.Type != RopeScaling.None && (!(rs.Factor > 0) || float.IsInfinity(rs.Factor))) errors.Add($"rope_scaling factor = {rs.Factor} must be finite and positive");
        if (rs.Type == RopeScaling.Llama3 && !(rs.HighFreqFactor > rs.LowFreqFactor && rs.LowFreqFactor > 0 && rs.OriginalMaxPositions > 0))
        {
            errors.Add($"rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0 and original_max_position_embeddings > 0 (got {rs.HighFreqFactor}, {rs.LowFreqFactor}, " +
                $"{rs.OriginalMaxPositions})");
        }

        if (errors.Count == 0) errors.AddRange(ModelMemory.OversizedTensors(this));
        if (errors.Count > 0) throw new ArgumentException($"{source}: " + string.Join("; ", errors));
    }

    /// <summary>Reads a Hugging Face config.json; an unsupported architecture is an error naming it.</summary>
    public static LlamaConfig Parse(string json, string source = "config.json") =>
        InputGuard.Parse(source, () => ParseCore(json, source));

    private static LlamaConfig ParseCore(string json, string source = "config.json")
    {
        JsonNode? root;
        try
        {
            root = JsonNode.Parse(json);
        }
        catch (JsonException e)
        {
            throw new PeftSharpInputException($"{source}: not valid JSON: {e.Message}", e);
        }

        if (root is not JsonObject o) throw new PeftSharpInputException($"{source}: not a JSON object");
        string? modelType = o["model_type"]?.Value<string>();
        var archs = o["architectures"] as JsonArray;
        var archNames = archs?.Select(a => a?.Value<string>() ?? "").ToArray() ?? Array.Empty<string>();
        if ((modelType != null && !SupportedModelTypes.Contains(modelType)) || (archNames.Length > 0 && !archNames.Any(SupportedArchitectures.Contains)))
        {
            throw new NotSupportedException(
                $"{source}: architectures [{string.Join(", ", archNames)}], model_type '{modelType}' is not supported; PeftSharp runs {string.Join(", ", SupportedArchitectures)} " +
                    $"(model_type {string.Join(" or ", SupportedModelTypes.Select(t => $"'{t}'"))})");
        }

        bool qwen3 = modelType == "qwen3" || archNames.Contains("Qwen3ForCausalLM");
        if (qwen3 && (modelType is not (null or "qwen3") || archNames.Any(a => a != "Qwen3ForCausalLM")))
        {
            throw new NotSupportedException($"{source}: architectures [{string.Join(", ", archNames)}] with model_type '{modelType}' mix Qwen3 and another architecture");
        }

        bool qwen2 = modelType == "qwen2" || archNames.Contains("Qwen2ForCausalLM");
        if (qwen2 && (modelType is not (null or "qwen2") || archNames.Any(a => a != "Qwen2ForCausalLM")))
        {
            throw new NotSupportedException($"{source}: architectures [{string.Join(", ", archNames)}] with model_type '{modelType}' mix Qwen2 and another architecture");
        }

        bool mistral = modelType == "mistral" || archNames.Contains("MistralForCausalLM");
        if (mistral && (modelType is not (null or "mistral") || archNames.Any(a => a != "MistralForCausalLM")))
        {
            throw new NotSupportedException($"{source}: architectures [{string.Join(", ", archNames)}] with model_type '{modelType}' mix Mistral and another architecture");
        }

        if (!mistral && o["sliding_window"] is JsonValue otherWindow && otherWindow.GetValueKind() != JsonValueKind.Null && !qwen3 && !qwen2)
        {
            throw new NotSupportedException($"{source}: sliding_window is set for model_type '{modelType}'; sliding-window attention is not supported");
        }

        if ((qwen3 || qwen2) && o["use_sliding_window"] is JsonValue sliding && sliding.Value<bool>())
        {
            throw new NotSupportedException($"{source}: use_sliding_window is true; sliding-window attention is not supported yet");
        }

        int Int(string name, int? fallback = null)
        {
            var n = o[name];
            if (n == null)
            {
                return fallback ?? throw new PeftSharpInputException($"{source}: missing '{name}'");
            }

            return n.Value<int>();
        }

        float Float(string name, float fallback) => o[name] is { } n ? (float)n.Value<double>() : fallback;

        int heads = Int("num_attention_heads");
        var ropeParameters = RopeParameters(o, source);
        var config = new LlamaConfig
        {
            HiddenSize = Int("hidden_size"),
            IntermediateSize = Int("intermediate_size"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = Int("num_key_value_heads", heads),
            NumHiddenLayers = Int("num_hidden_layers"),
            VocabSize = Int("vocab_size"),
            RmsNormEps = Float("rms_norm_eps", 1e-6f),
            RopeTheta = RopeThetaOf(o, ropeParameters, source),
            MaxPositionEmbeddings = Int("max_position_embeddings", 2048),
            TieWordEmbeddings = o["tie_word_embeddings"]?.Value<bool>() ?? false,
            HeadDimOverride = o["head_dim"] is { } hd ? hd.Value<int>() : null,
            QkNorm = qwen3,
            QkvBias = qwen2,
            Mistral = mistral,
            SlidingWindow = mistral && o["sliding_window"] is JsonValue window && window.GetValueKind() != JsonValueKind.Null ? window.Value<int>() : null,
        };
        config = config with { RopeScaling = RopeScalingOf(o, ropeParameters, source) };

        // Fields that change the graph PeftSharp would otherwise compute differently without a word.
        if (o["hidden_act"] is JsonValue act && act.Value<string>() != "silu")
        {
            throw new NotSupportedException($"{source}: hidden_act '{act.Value<string>()}' is not supported; the MLP is SwiGLU with silu");
        }

        foreach (var bias in new[] { "attention_bias", "mlp_bias" })
        {
            if (o[bias] is JsonValue b && b.Value<bool>()) throw new NotSupportedException($"{source}: {bias} is true; PeftSharp's linear layers have no bias");
        }

        config.Validate(source);
        return config;
    }

    /// <summary>
    /// rope_theta as transformers 4 writes it (top level) or 5 does (rope_parameters.rope_theta); both present and
    /// different is an error naming both, as the two layouts would give different models.
    /// </summary>
    private static float RopeThetaOf(JsonObject o, JsonObject? ropeParameters, string source)
    {
        float? top = o["rope_theta"] is JsonValue t ? (float)t.Value<double>() : null;
        float? nested = ropeParameters?["rope_theta"] is JsonValue n ? (float)n.Value<double>() : null;
        if (top != null && nested != null && top != nested)
        {
            throw new PeftSharpInputException($"{source}: rope_theta {top} and rope_parameters.rope_theta {nested} disagree (transformers 4 and 5 layouts); keep one");
        }

        return top ?? nested ?? 10000f;
    }

    /// <summary>
    /// The rope scaling of rope_scaling (transformers 4) or rope_parameters (transformers 5, whose rope_type
    /// "default" means none); both present and different is an error naming both.
    /// </summary>
    private static RopeScaling RopeScalingOf(JsonObject o, JsonObject? ropeParameters, string source)
    {
        RopeScaling? top = o["rope_scaling"] is JsonObject rs ? ScalingFrom(rs, "rope_scaling", source) : null;
        RopeScaling? nested = ropeParameters is { } rp ? ScalingFrom(rp, "rope_parameters", source) : null;
        if (top is { } a && nested is { } b && ScalingText(a) != ScalingText(b))
        {
            throw new PeftSharpInputException($"{source}: rope_scaling ({ScalingText(a)}) and rope_parameters ({ScalingText(b)}) disagree (transformers 4 and 5 layouts); keep one");
        }

        return top ?? nested ?? default;
    }

    /// <summary>transformers 5's rope_parameters object, or null; one object per attention type (Gemma 3's layout) is refused.</summary>
    private static JsonObject? RopeParameters(JsonObject o, string source)
    {
        if (o["rope_parameters"] is not JsonObject rp) return null;
        if (rp.Count > 0 && rp.All(kv => kv.Value is JsonObject))
        {
            throw new NotSupportedException($"{source}: rope_parameters per attention type ({string.Join(", ", rp.Select(kv => kv.Key))}) is not supported; one rope for every layer is");
        }

        return rp;
    }

    private static RopeScaling ScalingFrom(JsonObject rs, string key, string source)
    {
        string type = (rs["rope_type"] ?? rs["type"])?.Value<string>() ?? (key == "rope_parameters" ? "default" : "(none)");
        float Need(string name) => rs[name] is JsonValue v ? (float)v.Value<double>() : throw new PeftSharpInputException($"{source}: {key} ({type}) needs '{name}'");
        return type switch
        {
            "default" => default,
            "linear" => new RopeScaling { Type = RopeScaling.Linear, Factor = Need("factor") },
            "llama3" => new RopeScaling
            {
                Type = RopeScaling.Llama3, Factor = Need("factor"), LowFreqFactor = Need("low_freq_factor"), HighFreqFactor = Need("high_freq_factor"),
                OriginalMaxPositions = Need("original_max_position_embeddings"),
            },
            _ => throw new NotSupportedException($"{source}: {key} type '{type}' is not supported (supported: linear, llama3)"),
        };
    }

    /// <summary>Refuses a fine-tune whose config describes another graph than its base's, naming every difference.</summary>
    public static void RequireSameGraph(LlamaConfig baseConfig, LlamaConfig fine)
    {
        var diff = Differences(baseConfig, fine);
        if (diff.Count > 0) throw new ArgumentException($"the fine-tuned model's config differs from the base: {string.Join("; ", diff)}");
    }

    /// <summary>The fields in which two configs differ, as "name: a vs b" (empty when they describe the same graph).</summary>
    public static IReadOnlyList<string> Differences(LlamaConfig a, LlamaConfig b)
    {
        var fields = new (string Name, object A, object B)[]
        {
            ("hidden_size", a.HiddenSize, b.HiddenSize), ("intermediate_size", a.IntermediateSize, b.IntermediateSize),
            ("num_attention_heads", a.NumAttentionHeads, b.NumAttentionHeads), ("num_key_value_heads", a.NumKeyValueHeads, b.NumKeyValueHeads),
            ("num_hidden_layers", a.NumHiddenLayers, b.NumHiddenLayers), ("vocab_size", a.VocabSize, b.VocabSize),
            ("head_dim", a.HeadDim, b.HeadDim), ("tie_word_embeddings", a.TieWordEmbeddings, b.TieWordEmbeddings),
            ("rms_norm_eps", a.RmsNormEps, b.RmsNormEps), ("rope_theta", a.RopeTheta, b.RopeTheta),
            ("rope_scaling", ScalingText(a.RopeScaling), ScalingText(b.RopeScaling)), ("q/k norms (Qwen3)", a.QkNorm, b.QkNorm),
            ("sliding_window", a.SlidingWindow?.ToString() ?? "none", b.SlidingWindow?.ToString() ?? "none"), ("q/k/v biases (Qwen2)", a.QkvBias, b.QkvBias),
        };
        return fields.Where(f => !f.A.Equals(f.B)).Select(f => $"{f.Name}: {f.A} vs {f.B}").ToList();
    }

    private static string ScalingText(RopeScaling s) => s.Type switch
    {
        RopeScaling.Linear => $"linear x{s.Factor}",
        RopeScaling.Llama3 => $"llama3 x{s.Factor} ({s.LowFreqFactor}, {s.HighFreqFactor}, {s.OriginalMaxPositions})",
        _ => "none",
    };

    /// <summary>The config.json a Hugging Face LlamaForCausalLM reads.</summary>
    public string ToJson()
    {
        var o = new JsonObject
        {
            ["architectures"] = new JsonArray(QkNorm ? "Qwen3ForCausalLM" : QkvBias ? "Qwen2ForCausalLM" : Mistral ? "MistralForCausalLM" : "LlamaForCausalLM"),
            ["model_type"] = QkNorm ? "qwen3" : QkvBias ? "qwen2" : Mistral ? "mistral" : "llama",
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_attention_heads"] = NumAttentionHeads,
            ["num_key_value_heads"] = NumKeyValueHeads,
            ["num_hidden_layers"] = NumHiddenLayers,
            ["vocab_size"] = VocabSize,
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["hidden_act"] = "silu",
            ["torch_dtype"] = "float32",
        };
        if (HeadDimOverride is int hd) o["head_dim"] = hd;
        if (Mistral) o["sliding_window"] = SlidingWindow is int w ? JsonValue.Create(w) : null;
        if (QkvBias || QkNorm) o["use_sliding_window"] = false;
        if (RopeScaling.Type == RopeScaling.Linear) o["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = RopeScaling.Factor };
        if (RopeScaling.Type == RopeScaling.Llama3)
        {
            o["rope_scaling"] = new JsonObject
            {
                ["rope_type"] = "llama3", ["factor"] = RopeScaling.Factor, ["low_freq_factor"] = RopeScaling.LowFreqFactor,
                ["high_freq_factor"] = RopeScaling.HighFreqFactor, ["original_max_position_embeddings"] = (int)RopeScaling.OriginalMaxPositions,
            };
        }

        return o.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }
}
