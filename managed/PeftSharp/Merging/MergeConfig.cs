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

    /// <summary>
    /// slerp's t, as mergekit evaluates a conditional parameter: the first entry whose filter is in the tensor's name
    /// (or that has none); its values are one number, or a gradient interpolated over the layers.
    /// </summary>
    public IReadOnlyList<SlerpT> T { get; init; } = Array.Empty<SlerpT>();

    /// <summary>model_stock's filter_wise: the angle per output row (a 1-D tensor as one row) instead of per flattened tensor.</summary>
    public bool FilterWise { get; init; }

    /// <summary>The layer_range each source of a one-slice `slices:` config gave (checked against the models when they load).</summary>
    public IReadOnlyList<(string Model, int From, int To)> LayerRanges { get; init; } = Array.Empty<(string, int, int)>();

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
        ["slerp"] = MergeMethod.Slerp,
        ["model_stock"] = MergeMethod.ModelStock,
        ["della"] = MergeMethod.Della,
        ["della_linear"] = MergeMethod.DellaLinear,
    };

    private static readonly string[] TopKeys = { "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "name" };
    private static readonly string[] ModelKeys = { "weight", "density", "gamma", "epsilon" };
    private static readonly string[] GlobalKeys = { "normalize", "rescale", "lambda", "int8_mask", "lines_alpha", "lines_beta", "weight", "density", "gamma", "epsilon", "filter_wise" };

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
        foreach (var k in top.Keys.Except(TopKeys)) problems.Add($"unknown key '{k}'");
        string methodName = Scalar(top, "merge_method", problems) ?? "";
        if (!Methods.TryGetValue(methodName, out var method))
        {
            problems.Add($"merge_method '{methodName}' is not supported (supported: {string.Join(", ", Methods.Keys)})");
        }

        string? baseModel = top.TryGetValue("base_model", out var b) ? ScalarOf(b, "base_model", problems) : null;
        // slerp's t may be a list of filtered values and gradients: read apart from the plain options.
        var slerpT = new List<SlerpT>();
        if (top.TryGetValue("parameters", out var gpNode) && gpNode is YamlMappingNode gpMap && gpMap.Children.Any(kv => kv.Key is YamlScalarNode { Value: "t" }))
        {
            slerpT = ReadT(gpMap.Children.First(kv => kv.Key is YamlScalarNode { Value: "t" }).Value, problems);
            var rest = new YamlMappingNode();
            foreach (var kv in gpMap.Children.Where(kv => kv.Key is not YamlScalarNode { Value: "t" })) rest.Add(kv.Key, kv.Value);
            gpNode = rest;
        }

        var globalGradients = new Dictionary<string, float[]>();
        var global = gpNode != null ? Options(gpNode, "parameters", GlobalKeys, problems, globalGradients) : new Dictionary<string, string>();
        // A model's scalar parameters: its own, else the top-level ones, else mergekit's defaults.
        MergeInput InputOf(Dictionary<string, string> p, string where) => new(
            Num(p, "weight", Num(global, "weight", 1f, "parameters"), where + ".parameters"),
            Num(p, "density", Num(global, "density", 1f, "parameters"), where + ".parameters"),
            Num(p, "gamma", Num(global, "gamma", 0.01f, "parameters"), where + ".parameters"))
        {
            Epsilon = Num(p, "epsilon", Num(global, "epsilon", 0.15f, "parameters"), where + ".parameters"),
        };

        // A model's gradients: its own lists, then the top-level lists for what it gives no value of its own.
        Dictionary<string, float[]> GradientsOf(Dictionary<string, string> own, Dictionary<string, float[]> ownLists) =>
            globalGradients.Where(g => !own.ContainsKey(g.Key) && !ownLists.ContainsKey(g.Key)).Concat(ownLists).ToDictionary(g => g.Key, g => g.Value);
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
        var layerRanges = new List<(string, int, int)>();
        if (top.TryGetValue("slices", out var slicesNode))
        {
            // One slice over whole models is the same merge as a models list (how most slerp configs are written);
            // layer stacking (several slices, or ranges short of the model) is not supported.
            if (top.ContainsKey("models")) problems.Add("give models or slices, not both");
            if (slicesNode is not YamlSequenceNode { Children.Count: 1 } one || one.Children[0] is not YamlMappingNode slice)
            {
                problems.Add("slices: only one slice over the whole models is supported (several slices stack layers: passthrough, not supported)");
            }
            else
            {
                var sm = Map(slice, problems, "slices[0]");
                foreach (var k in sm.Keys.Except(new[] { "sources" })) problems.Add($"slices[0]: unknown key '{k}'");
                int i = 0;
                foreach (var src in (sm.TryGetValue("sources", out var sn) ? sn as YamlSequenceNode : null)?.Children ?? new List<YamlNode>())
                {
                    string where = $"slices[0].sources[{i++}]";
                    if (src is not YamlMappingNode srcMap)
                    {
                        problems.Add($"{where} must be a mapping");
                        continue;
                    }

                    var e = Map(srcMap, problems, where);
                    foreach (var k in e.Keys.Except(new[] { "model", "layer_range", "parameters" })) problems.Add($"{where}: unknown key '{k}'");
                    string? model = Scalar(e, "model", problems, where);
                    var lists = new Dictionary<string, float[]>();
                    var p = e.TryGetValue("parameters", out var pn) ? Options(pn, where + ".parameters", ModelKeys, problems, lists) : new Dictionary<string, string>();
                    if (e.TryGetValue("layer_range", out var lr) && lr is YamlSequenceNode { Children.Count: 2 } range
                        && int.TryParse((range.Children[0] as YamlScalarNode)?.Value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int from)
                        && int.TryParse((range.Children[1] as YamlScalarNode)?.Value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int to))
                    {
                        if (model != null) layerRanges.Add((model, from, to));
                    }
                    else
                    {
                        problems.Add($"{where}: layer_range must be [from, to]");
                    }

                    if (model != null)
                    {
                        models.Add(new MergeModelEntry(model, InputOf(p, where)) { Gradients = GradientsOf(p, lists) });
                    }
                }
            }
        }

        if (!top.TryGetValue("models", out var ms) || ms is not YamlSequenceNode seq)
        {
            if (!top.ContainsKey("slices")) problems.Add("models must be a list of {model: ..., parameters: ...}");
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
                var lists = new Dictionary<string, float[]>();
                var p = entry.TryGetValue("parameters", out var pn) ? Options(pn, where + ".parameters", ModelKeys, problems, lists) : new Dictionary<string, string>();
                if (model != null)
                {
                    models.Add(new MergeModelEntry(model, InputOf(p, where)) { Gradients = GradientsOf(p, lists) });
                }
            }
        }

        string dtype = top.TryGetValue("dtype", out var dt) ? ScalarOf(dt, "dtype", problems) ?? "float32" : "float32";
        if (dtype is not ("float32" or "float16" or "bfloat16")) problems.Add($"dtype '{dtype}' is not float32, float16 or bfloat16");
        // mergekit computes in dtype and writes out_dtype (default: dtype); PeftSharp computes in double and fp32 and
        // writes the output type.
        if (top.TryGetValue("out_dtype", out var od))
        {
            dtype = ScalarOf(od, "out_dtype", problems) ?? dtype;
            if (dtype is not ("float32" or "float16" or "bfloat16")) problems.Add($"out_dtype '{dtype}' is not float32, float16 or bfloat16");
        }
        if (method != MergeMethod.Linear && baseModel == null && Methods.ContainsKey(methodName)) problems.Add($"{methodName} needs a base_model");
        // mergekit's registry: normalize defaults to true for linear, ties and della, false for the others.
        bool normalizeDefault = method is MergeMethod.Linear or MergeMethod.Ties or MergeMethod.Della;
        var config = new MergeConfig(method, baseModel, models, Flag("normalize", normalizeDefault), Num(global, "lambda", 1f, "parameters"), dtype,
            global.ContainsKey("lines_alpha") ? Num(global, "lines_alpha", 0f, "parameters") : null,
            global.ContainsKey("lines_beta") ? Num(global, "lines_beta", 1f, "parameters") : null);
        string? tokenizerSource = top.TryGetValue("tokenizer_source", out var ts) ? ScalarOf(ts, "tokenizer_source", problems) : null;
        if (tokenizerSource == "union") problems.Add("tokenizer_source 'union' (a merged vocabulary) is not supported; use base or a model path");
        if (tokenizerSource == "base" && baseModel == null) problems.Add("tokenizer_source 'base' needs a base_model");
        config = config with { TokenizerSource = tokenizerSource, Rescale = Flag("rescale", TaskVectorMerge.DefaultRescale(method)), T = slerpT, LayerRanges = layerRanges };
        if (method == MergeMethod.Slerp)
        {
            if (slerpT.Count == 0) problems.Add("slerp needs parameters.t");
            if (global.ContainsKey("lines_alpha") || global.ContainsKey("lines_beta")) problems.Add("lines_alpha / lines_beta scale task vectors; slerp has none");
            if (global.ContainsKey("normalize") || global.ContainsKey("lambda")) problems.Add("normalize and lambda are task-vector options; slerp does not take them");
            if (baseModel != null && models.Select(m => m.Model).Append(baseModel).Distinct().Count() != 2)
            {
                problems.Add("slerp interpolates between two models: the base_model and one other");
            }
        }
        else if (method == MergeMethod.ModelStock)
        {
            config = config with { FilterWise = Flag("filter_wise", false) };
            if (baseModel != null && models.Select(m => m.Model).Where(m => m != baseModel).Distinct().Count() < 2)
            {
                problems.Add("model_stock needs the base_model and at least two other models");
            }

            if (models.Any(m => m.Parameters != new MergeInput() || m.Gradients.Count > 0) || global.Keys.Any(k => k is "weight" or "density" or "gamma"))
            {
                problems.Add("model_stock takes no weight, density or gamma (its interpolation comes from the angle between the fine-tunes)");
            }

            if (new[] { "lines_alpha", "lines_beta", "normalize", "lambda" }.Any(global.ContainsKey))
            {
                problems.Add("normalize, lambda and lines_* are task-vector options; model_stock does not take them");
            }
        }

        if (method != MergeMethod.ModelStock && global.ContainsKey("filter_wise")) problems.Add($"filter_wise is model_stock's; {methodName} does not take it");
        if (method != MergeMethod.Slerp && slerpT.Count > 0)
        {
            problems.Add($"parameters.t is slerp's; {methodName} does not take it");
        }

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

    /// <summary>slerp's t: a number, a gradient list, or a list of {filter, value} entries whose values are either.</summary>
    private static List<SlerpT> ReadT(YamlNode node, List<string> problems)
    {
        float[]? Values(YamlNode n, string where)
        {
            if (n is YamlScalarNode s)
            {
                if (float.TryParse(s.Value, NumberStyles.Float, CultureInfo.InvariantCulture, out float v) && float.IsFinite(v)) return new[] { v };
            }
            else if (n is YamlSequenceNode list && list.Children.Count > 0 && list.Children.All(c => c is YamlScalarNode))
            {
                var vs = list.Children.Select(c => float.TryParse(((YamlScalarNode)c).Value, NumberStyles.Float, CultureInfo.InvariantCulture, out float v) && float.IsFinite(v) ? v : float.NaN)
                    .ToArray();
                if (vs.All(float.IsFinite)) return vs;
            }

            problems.Add($"{where} must be a finite number or a list of them");
            return null;
        }

        var result = new List<SlerpT>();
        if (node is YamlSequenceNode seq && seq.Children.Count > 0 && seq.Children.All(c => c is YamlMappingNode))
        {
            int i = 0;
            foreach (YamlMappingNode entry in seq.Children)
            {
                string where = $"parameters.t[{i++}]";
                var e = Map(entry, problems, where);
                foreach (var k in e.Keys.Except(new[] { "filter", "value" })) problems.Add($"{where}: unknown key '{k}'");
                string? filter = e.TryGetValue("filter", out var f) ? ScalarOf(f, where + ".filter", problems) : null;
                if (e.TryGetValue("value", out var v) && Values(v, where + ".value") is { } vs) result.Add(new SlerpT(filter, vs));
                else if (!e.ContainsKey("value")) problems.Add($"{where}: value is missing");
            }
        }
        else if (Values(node, "parameters.t") is { } vs)
        {
            result.Add(new SlerpT(null, vs));
        }

        return result;
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

    private static Dictionary<string, string> Options(YamlNode n, string where, string[] allowed, List<string> problems, Dictionary<string, float[]>? gradients = null)
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
            else if (gradients != null && k is "weight" or "density" or "gamma" && v is YamlSequenceNode list && list.Children.Count > 0
                && list.Children.All(c => c is YamlScalarNode sc && float.TryParse(sc.Value, NumberStyles.Float, CultureInfo.InvariantCulture, out float f) && float.IsFinite(f)))
            {
                gradients[k] = list.Children.Select(c => float.Parse(((YamlScalarNode)c).Value!, NumberStyles.Float, CultureInfo.InvariantCulture)).ToArray();
            }
            else problems.Add($"{where}.{k}: per-layer values are supported as a list of numbers for weight, density and gamma only");
        }

        return result;
    }
}
