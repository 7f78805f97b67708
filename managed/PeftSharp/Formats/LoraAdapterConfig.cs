using System.Text.RegularExpressions;
using PeftSharp.Model;

namespace PeftSharp.Formats;

/// <summary>
/// The parts of a PEFT LoRA adapter_config.json that PeftSharp honours. Built in code, the defaults are the `peft`
/// host's: r 8, alpha 16 (scale 2), every linear layer when no targets are named. Read from a file, a missing r or
/// lora_alpha takes PEFT's defaults (8 and 8), as PEFT reads it.
/// </summary>
public sealed record LoraAdapterConfig
{
    public int R { get; init; } = 8;
    public float LoraAlpha { get; init; } = 16;
    public float LoraDropout { get; init; }
    public bool UseRsLora { get; init; }
    /// <summary>DoRA: a trained magnitude vector per targeted module (lora_magnitude_vector, [out]).</summary>
    public bool UseDora { get; init; }

    /// <summary>
    /// PEFT's lora_bias: lora_B carries a bias (lora_B.bias, [out]), so the branch adds s (B A x + b). It merges only into
    /// a module that has a bias (PEFT refuses the merge otherwise); served unmerged it is each row's own bias. Not with DoRA.
    /// </summary>
    public bool LoraBias { get; init; }
    /// <summary>
    /// List form: module names matched by their last component; or one string (<see cref="TargetRegex"/>): "all-linear"
    /// or a regex over the module path. Neither given: every linear layer, as "all-linear".
    /// </summary>
    public IReadOnlyList<string> TargetModules { get; init; } = Array.Empty<string>();
    public string? TargetRegex { get; init; }

    /// <summary>PEFT's exclude_modules, list form (names or path suffixes, as target_modules) ...</summary>
    public IReadOnlyList<string> ExcludeModules { get; init; } = Array.Empty<string>();

    /// <summary>PEFT's modules_to_save: modules the adapter keeps whole copies of (see <see cref="PeftLoraAdapter.Saved"/>).</summary>
    public IReadOnlyList<string> ModulesToSave { get; init; } = Array.Empty<string>();

    /// <summary>... or one regular expression over the module path (full match).</summary>
    public string? ExcludeRegex { get; init; }

    /// <summary>
    /// init_lora_weights when it changes the base (PEFT's "pissa", "olora"): the adapter's starting product is
    /// subtracted from the base when it loads, so <see cref="PeftLoraAdapter.Load(string, LlamaModel)"/> folds that
    /// into the adapter; null for initialisations that leave the base alone (true, false, "gaussian").
    /// </summary>
    public string? InitLoraWeights { get; init; }
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();
    public IReadOnlyDictionary<string, float> AlphaPattern { get; init; } = new Dictionary<string, float>();
    public string? BaseModelNameOrPath { get; init; }
    public string TaskType { get; init; } = "CAUSAL_LM";

    /// <summary>
    /// PEFT's alora_invocation_tokens: an activated LoRA (aLoRA), which adapts a sequence only from the start of the
    /// last occurrence of these tokens on; positions before it are the base model's, so a server reuses the base's KV
    /// cache for them. Null: an ordinary LoRA. Such an adapter is never merged into weights.
    /// </summary>
    public IReadOnlyList<int>? AloraInvocationTokens { get; init; }

    /// <summary>
    /// Where an activated LoRA starts adapting <paramref name="tokens"/> (T): the start of the last occurrence of
    /// <see cref="AloraInvocationTokens"/>, as PEFT's calculate_alora_offsets finds it; -1 when they do not occur (PEFT
    /// then runs the base model for the whole sequence). 0 for an ordinary LoRA (every position adapted).
    /// </summary>
    public int InvocationStart(IReadOnlyList<int> tokens)
    {
        if (AloraInvocationTokens is not { } inv) return 0;
        for (int start = tokens.Count - inv.Count; start >= 0; start--)
        {
            int k = 0;
            while (k < inv.Count && tokens[start + k] == inv[k]) k++;
            if (k == inv.Count) return start;
        }

        return -1;
    }

    /// <summary>The seven linear layers of a Llama block, as PEFT's "all-linear" selects them (the LM head excluded).</summary>
    public static readonly string[] LlamaLinear = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" };

    /// <summary>
    /// Rank and alpha for a module: the first rank_pattern / alpha_pattern key that matches it the way PEFT's
    /// get_pattern_key does (the key as a regular expression, <c>(.*\.)?{key}$</c> over the module path, so both
    /// "q_proj" and "^model.layers.0.self_attn.q_proj" work), else r and lora_alpha.
    /// </summary>
    public (int Rank, float Alpha) For(string module)
    {
        int r = RankPattern.FirstOrDefault(p => PatternMatches(p.Key, module)).Value;
        float a = AlphaPattern.FirstOrDefault(p => PatternMatches(p.Key, module)).Value;
        return (r > 0 ? r : R, a > 0 ? a : LoraAlpha);
    }

    private static readonly TimeSpan PatternTimeout = TimeSpan.FromSeconds(1);

    /// <summary>PEFT's get_pattern_key test: re.match(rf"(.*\.)?({key})$", module).</summary>
    internal static bool PatternMatches(string key, string module) =>
        System.Text.RegularExpressions.Regex.IsMatch(module, $"^(?:.*\\.)?(?:{key})$", System.Text.RegularExpressions.RegexOptions.CultureInvariant, PatternTimeout);

    /// <summary>Whether a pattern key compiles as the regular expression <see cref="PatternMatches"/> builds from it.</summary>
    internal static bool IsPatternKey(string key)
    {
        try
        {
            _ = new System.Text.RegularExpressions.Regex($"^(?:.*\\.)?(?:{key})$", System.Text.RegularExpressions.RegexOptions.CultureInvariant, PatternTimeout);
            return true;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }

    /// <summary>PEFT's scaling: alpha / r, or alpha / sqrt(r) with use_rslora.</summary>
    public float Scale(string module)
    {
        var (r, a) = For(module);
        return UseRsLora ? a / MathF.Sqrt(r) : a / r;
    }

    /// <summary>Every linear module path of a Llama model (model.layers.{i}.self_attn.q_proj, ...), layer by layer.</summary>
    public static IEnumerable<string> LlamaLinearModules(LlamaConfig model) =>
        Enumerable.Range(0, model.NumHiddenLayers).SelectMany(i => LlamaLinear.Select(name =>
            $"model.layers.{i}.{(name is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn")}.{name}"));

    /// <summary>PEFT's list test: the module path is an entry, or ends with "." and an entry ("q_proj", "self_attn.q_proj").</summary>
    public static bool ListMatches(IReadOnlyList<string> entries, string path) =>
        entries.Any(t => path == t || path.EndsWith("." + t, StringComparison.Ordinal));

    /// <summary>The module paths of <paramref name="model"/> this config targets.</summary>
    public IEnumerable<string> TargetsIn(LlamaConfig model)
    {
        for (int i = 0; i < model.NumHiddenLayers; i++)
        {
            if (LayersToTransform != null && !LayersToTransform.Contains(i)) continue;
            foreach (var name in LlamaLinear)
            {
                string path = $"model.layers.{i}.{(name is "gate_proj" or "up_proj" or "down_proj" ? "mlp" : "self_attn")}.{name}";
                bool hit = TargetRegex switch
                {
                    "all-linear" => true,
                    { } rx => Regex.IsMatch(path, "^(?:" + rx + ")$"),
                    null => TargetModules.Count == 0 || ListMatches(TargetModules, path),
                };
                bool excluded = ExcludeRegex is { } ex ? Regex.IsMatch(path, "^(?:" + ex + ")$") : ListMatches(ExcludeModules, path);
                if (hit && !excluded) yield return path;
            }
        }
    }
}
