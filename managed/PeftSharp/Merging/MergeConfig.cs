using PeftSharp.Formats;
using System.Globalization;
using YamlDotNet.RepresentationModel;

namespace PeftSharp.Merging;

/// <summary>
/// A merge described in mergekit's schema (YAML or JSON): `merge_method`, `base_model`, `models[].model`,
/// `models[].parameters.weight|density|gamma`, `parameters.normalize|lambda|int8_mask` (and top-level defaults for
/// the per-model options), `dtype`. PeftSharp adds `parameters.lines_alpha` and `parameters.lines_beta` for LiNeS-style
/// layer scaling of the merged task vector. `tokenizer_source` is `base` (the default when there is a base model) or a
/// model path whose tokenizer files the merged folder carries; `union` (a merged vocabulary) is not supported.
/// Anything else is an error naming it, so a config never half-applies.
/// </summary>
public sealed record MergeConfig(
    MergeMethod Method, string? BaseModel, IReadOnlyList<MergeModelEntry> Models, bool Normalize, float Lambda, string Dtype,
    float? LinesAlpha, float? LinesBeta)
{
    /// <summary>
    /// mergekit's rescale: scale each sparsified task vector back to its L1 norm (default: true for dare_linear and
    /// dare_ties, false for the others).
    /// </summary>
    public bool Rescale { get; init; }

    /// <summary>Whose tokenizer files the merged model carries: "base", a model path, or null (the base, else the first model).</summary>
    public string? TokenizerSource { get; init; }

    public static readonly IReadOnlyDictionary<string, MergeMethod> Methods = new Dictionary<string, MergeMethod>
    {
        ["linear"] = MergeMethod.Linear,
        ["task_arithmetic"] = MergeMethod.TaskArithmetic,
        ["ties"] = MergeMethod.Ties,
        ["dare_linear"] = MergeMethod.DareLinear,
        ["dare_ties"] = MergeMethod.DareTies,
        ["breadcrumbs"] = MergeMethod.Breadcrumbs,
        ["breadcrumbs_ties"] = MergeMethod.BreadcrumbsTies,
    };

    private static readonly string[] TopKeys = { "merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "name" };
    private static readonly string[] ModelKeys = { "weight", "density", "gamma" };
    private static readonly string[] GlobalKeys = { "normalize", "rescale", "lambda", "int8_mask", "lines_alpha", "lines_beta", "weight", "density", "gamma" };

    public static MergeConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"merge config {path} does not exist", path);
        return Parse(File.ReadAllText(path), path);
    }

    public static MergeConfig Parse(string text, string source) =>
        InputGuard.Parse(source, () => ParseCore(text, source));

    private static MergeConfig ParseCore(string text, string source)
    {
        YamlMappingNode root;
        try
        {
            var stream = new YamlStream();
            stream.Load(new StringReader(text));
            root = stream.Documents.Count == 1 && stream.Documents[0].RootNode is YamlMappingNode m
                ? m
                : throw new PeftSharpInputException($"{source}: expected one YAML (or JSON) mapping");
        }
        catch (YamlDotNet.Core.YamlException e)
        {
            throw new PeftSharpInputException($"{source}: not valid YAML at line {e.Start.Line}: {e.Message}", e);
        }

        var problems = new List<string>();
        var top = Map(root, problems, "the top level");
        foreach (var k in top.Keys.Except(TopKeys)) problems.Add(k == "slices" ? "slices (layer-range merges) are not supported" : $"unknown key '{k}'");
        string methodName = Scalar(top, "merge_method", problems) ?? "";
        if (!Methods.TryGetValue(methodName, out var method))
        {
            problems.Add($"merge_method '{methodName}' is not supported (supported: {string.Join(", ", Methods.Keys)})");
        }

        string? baseModel = top.TryGetValue("base_model", out var b) ? ScalarOf(b, "base_model", problems) : null;
        var global = top.TryGetValue("parameters", out var gp) ? Options(gp, "parameters", GlobalKeys, problems) : new Dictionary<string, string>();
        float Num(IReadOnlyDictionary<string, string> d, string key, float fallback, string where)
        {
            if (!d.TryGetValue(key, out var v)) return fallback;
            if (float.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out float f) && float.IsFinite(f)) return f;
            problems.Add($"{where}.{key} '{v}' is not a finite number");
            return fallback;
        }

        bool Flag(string key, bool fallback)
        {
            if (!global.TryGetValue(key, out var v)) return fallback;
            if (bool.TryParse(v, out bool f)) return f;
            problems.Add($"parameters.{key} '{v}' is not true or false");
            return fallback;
        }

        var models = new List<MergeModelEntry>();
        if (!top.TryGetValue("models", out var ms) || ms is not YamlSequenceNode seq)
        {
            problems.Add("models must be a list of {model: ..., parameters: ...}");
        }
        else
        {
            int i = 0;
            foreach (var node in seq.Children)
            {
                string where = $"models[{i++}]";
                if (node is not YamlMappingNode mm)
                {
                    problems.Add($"{where} must be a mapping");
                    continue;
                }

                var entry = Map(mm, problems, where);
                foreach (var k in entry.Keys.Except(new[] { "model", "parameters" })) problems.Add($"{where}: unknown key '{k}'");
                string? model = Scalar(entry, "model", problems, where);
                var p = entry.TryGetValue("parameters", out var pn) ? Options(pn, where + ".parameters", ModelKeys, problems) : new Dictionary<string, string>();
                if (model != null)
                {
                    models.Add(new MergeModelEntry(model, new MergeInput(
                        Num(p, "weight", Num(global, "weight", 1f, "parameters"), where + ".parameters"),
                        Num(p, "density", Num(global, "density", 1f, "parameters"), where + ".parameters"),
                        Num(p, "gamma", Num(global, "gamma", 0.01f, "parameters"), where + ".parameters"))));
                }
            }
        }

        string dtype = top.TryGetValue("dtype", out var dt) ? ScalarOf(dt, "dtype", problems) ?? "float32" : "float32";
        if (dtype is not ("float32" or "float16" or "bfloat16")) problems.Add($"dtype '{dtype}' is not float32, float16 or bfloat16");
        if (method != MergeMethod.Linear && baseModel == null && Methods.ContainsKey(methodName)) problems.Add($"{methodName} needs a base_model");
        // mergekit's registry: normalize defaults to true for linear and ties, false for dare_ties and breadcrumbs_ties.
        bool normalizeDefault = method is MergeMethod.Linear or MergeMethod.Ties;
        var config = new MergeConfig(method, baseModel, models, Flag("normalize", normalizeDefault), Num(global, "lambda", 1f, "parameters"), dtype,
            global.ContainsKey("lines_alpha") ? Num(global, "lines_alpha", 0f, "parameters") : null,
            global.ContainsKey("lines_beta") ? Num(global, "lines_beta", 1f, "parameters") : null);
        string? tokenizerSource = top.TryGetValue("tokenizer_source", out var ts) ? ScalarOf(ts, "tokenizer_source", problems) : null;
        if (tokenizerSource == "union") problems.Add("tokenizer_source 'union' (a merged vocabulary) is not supported; use base or a model path");
        if (tokenizerSource == "base" && baseModel == null) problems.Add("tokenizer_source 'base' needs a base_model");
        config = config with { TokenizerSource = tokenizerSource, Rescale = Flag("rescale", TaskVectorMerge.DefaultRescale(method)) };
        if (method is MergeMethod.Breadcrumbs or MergeMethod.BreadcrumbsTies && models.Any(m => m.Parameters.Gamma == 0f && m.Parameters.Density < 1f))
        {
            problems.Add("gamma 0 with density < 1: mergekit's magnitude_outliers then keeps no entry (its slice [n_bot:-0] is empty); use ties for a plain " +
                "magnitude trim, or gamma > 0");
        }

        Flag("int8_mask", false); // a memory setting in mergekit; the result does not depend on it
        if (config.LinesAlpha.HasValue != config.LinesBeta.HasValue) problems.Add("lines_alpha and lines_beta go together");
        if (problems.Count > 0) throw new PeftSharpInputException($"{source}: {string.Join("; ", problems)}");
        return config;
    }

    /// <summary>A mapping's entries by key; a key that is not a plain value, or that repeats, is a problem (mergekit's loader refuses both).</summary>
    private static Dictionary<string, YamlNode> Map(YamlMappingNode m, List<string> problems, string where)
    {
        var result = new Dictionary<string, YamlNode>(StringComparer.Ordinal);
        foreach (var (key, value) in m.Children)
        {
            if (key is not YamlScalarNode { Value: { } name })
            {
                problems.Add($"{where}: a key at line {key.Start.Line} is not a plain name");
            }
            else if (!result.TryAdd(name, value))
            {
                problems.Add($"{where}: key '{name}' appears twice");
            }
        }

        return result;
    }

    private static string? Scalar(Dictionary<string, YamlNode> d, string key, List<string> problems, string where = "")
    {
        if (!d.TryGetValue(key, out var n))
        {
            problems.Add($"{(where.Length > 0 ? where + ": " : "")}{key} is missing");
            return null;
        }

        return ScalarOf(n, key, problems);
    }

    private static string? ScalarOf(YamlNode n, string key, List<string> problems)
    {
        if (n is YamlScalarNode s) return s.Value;
        problems.Add($"{key} must be a single value");
        return null;
    }

    private static Dictionary<string, string> Options(YamlNode n, string where, string[] allowed, List<string> problems)
    {
        var result = new Dictionary<string, string>();
        if (n is not YamlMappingNode m)
        {
            problems.Add($"{where} must be a mapping");
            return result;
        }

        foreach (var (k, v) in Map(m, problems, where))
        {
            if (!allowed.Contains(k)) problems.Add($"{where}: option '{k}' is not supported");
            else if (v is YamlScalarNode s) result[k] = s.Value ?? "";
            else problems.Add($"{where}.{k}: per-layer (gradient) values are not supported, give one number");
        }

        return result;
    }
}
