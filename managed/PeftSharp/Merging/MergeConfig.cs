using PeftSharp.Formats;
using System.Globalization;
using YamlDotNet.RepresentationModel;

namespace PeftSharp.Merging;

/// <summary>
/// A merge described in mergekit's schema (YAML or JSON): `merge_method`, `base_model`, `models[].model` or `slices[].sources[]`
/// (model and layer_range; several slices stack layers), parameters at the source, slice and top level (mergekit's order
/// of precedence), each a number, a gradient over the layers or a list of {filter, value} entries, `dtype` and
/// `out_dtype`. PeftSharp adds `parameters.lines_alpha` and `parameters.lines_beta` for LiNeS-style layer scaling of
/// the merged task vector. `tokenizer_source` is `base` (the default when there is a base model) or a model path whose
/// tokenizer files the merged folder carries; `union` (a merged vocabulary) is not supported. Anything else, and any
/// option the method does not read, is an error naming it, so a config never half-applies.
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
    /// The output slices, in order. A `models` config is one slice over the whole models, with the base_model appended
    /// as a source when it is not listed (as mergekit's planner does; not for linear, which has no base).
    /// </summary>
    public IReadOnlyList<MergeSlice> Slices { get; init; } = Array.Empty<MergeSlice>();

    /// <summary>The top-level parameters by name (each a list of entries: see <see cref="MergeSetting"/>).</summary>
    public IReadOnlyDictionary<string, IReadOnlyList<MergeSetting>> Settings { get; init; } = new Dictionary<string, IReadOnlyList<MergeSetting>>();

    /// <summary>model_stock's filter_wise: the angle per output row (a 1-D tensor as one row) instead of per flattened tensor.</summary>
    public bool FilterWise { get; init; }

    /// <summary>nuslerp_flatten (default true): each tensor is one vector; false: rows (or columns, with <see cref="NuslerpRowWise"/>).</summary>
    public bool NuslerpFlatten { get; init; } = true;

    /// <summary>nuslerp_row_wise (default false): with nuslerp_flatten false, interpolate the columns (vectors along dimension 0) instead of the rows.</summary>
    public bool NuslerpRowWise { get; init; }

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
        ["passthrough"] = MergeMethod.Passthrough,
        ["nuslerp"] = MergeMethod.Nuslerp,
        ["karcher"] = MergeMethod.Karcher,
        ["sce"] = MergeMethod.Sce,
    };

    private static readonly string[] TopKeys = { "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "name" };

    /// <summary>Per-model (tensor) parameters: mergekit reads them from a source's parameters, its slice's and the top level.</summary>
    private static readonly string[] ModelKeys = { "weight", "density", "gamma", "epsilon" };

    /// <summary>Whole-merge numbers: mergekit reads them from the slice's and the top-level parameters only.</summary>
    private static readonly string[] MergeKeys = { "t", "lambda", "scale", "select_topk", "max_iter", "tol", "lines_alpha", "lines_beta" };

    /// <summary>Switches: top-level parameters only.</summary>
    private static readonly string[] FlagKeys = { "normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise" };

    /// <summary>The numbers and switches each method reads (the task-vector family shares one set, as before).</summary>
    private static (string[] Numbers, string[] Flags) OptionsOf(MergeMethod m) => m switch
    {
        MergeMethod.Slerp => (new[] { "t" }, Array.Empty<string>()),
        MergeMethod.ModelStock => (Array.Empty<string>(), new[] { "filter_wise" }),
        MergeMethod.Passthrough => (new[] { "scale" }, Array.Empty<string>()),
        MergeMethod.Nuslerp => (new[] { "weight" }, new[] { "nuslerp_flatten", "nuslerp_row_wise" }),
        MergeMethod.Karcher => (new[] { "max_iter", "tol" }, Array.Empty<string>()),
        MergeMethod.Sce => (new[] { "select_topk" }, new[] { "int8_mask" }),
        _ => (new[] { "weight", "density", "gamma", "epsilon", "lambda", "lines_alpha", "lines_beta" }, new[] { "normalize", "rescale", "int8_mask" }),
    };

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
        var seen = new List<(string Where, string Key)>();
        var flags = new Dictionary<string, string>();
        var global = top.TryGetValue("parameters", out var gp)
            ? ReadSettings(gp, "parameters", ModelKeys.Concat(MergeKeys).ToArray(), problems, seen, flags)
            : new Dictionary<string, List<MergeSetting>>();

        bool Flag(string key, bool fallback)
        {
            if (!flags.TryGetValue(key, out var v)) return fallback;
            if (bool.TryParse(v, out bool f)) return f;
            problems.Add($"parameters.{key} '{v}' is not true or false");
            return fallback;
        }

        float? One(string key)
        {
            if (!global.TryGetValue(key, out var entries)) return null;
            if (entries is [{ Filter: null, Values: [float v] }]) return v;
            problems.Add($"parameters.{key} must be one number");
            return null;
        }

        // A source: its own parameters first, then its slice's, then the top level's (mergekit's ConfigReader order).
        MergeModelEntry? Source(YamlNode node, string where, bool sliced, Dictionary<string, List<MergeSetting>> slice)
        {
            if (node is not YamlMappingNode srcMap)
            {
                problems.Add($"{where} must be a mapping");
                return null;
            }

            var e = Map(srcMap, problems, where);
            var keys = sliced ? new[] { "model", "layer_range", "parameters" } : new[] { "model", "parameters" };
            foreach (var k in e.Keys.Except(keys)) problems.Add($"{where}: unknown key '{k}'");
            string? model = Scalar(e, "model", problems, where);
            var own = e.TryGetValue("parameters", out var pn) ? ReadSettings(pn, where + ".parameters", ModelKeys, problems, seen, null) : new();
            int? from = null, to = null;
            if (sliced)
            {
                if (e.TryGetValue("layer_range", out var lr) && lr is YamlSequenceNode { Children.Count: 2 } range
                    && int.TryParse((range.Children[0] as YamlScalarNode)?.Value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int f)
                    && int.TryParse((range.Children[1] as YamlScalarNode)?.Value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int t) && f >= 0 && t > f)
                {
                    (from, to) = (f, t);
                }
                else
                {
                    problems.Add($"{where}: layer_range must be [from, to] with 0 <= from < to");
                }
            }

            return model == null ? null : new MergeModelEntry(model, Chain(own, slice, global)) { From = from, To = to };
        }

        var slices = new List<MergeSlice>();
        var listed = new List<MergeModelEntry>();
        if (top.TryGetValue("slices", out var slicesNode))
        {
            if (top.ContainsKey("models")) problems.Add("give models or slices, not both");
            if (slicesNode is not YamlSequenceNode { Children.Count: > 0 } sliceList) problems.Add("slices must be a list of {sources: [...]}");
            else
            {
                for (int s = 0; s < sliceList.Children.Count; s++)
                {
                    string where = $"slices[{s}]";
                    if (sliceList.Children[s] is not YamlMappingNode sliceMap)
                    {
                        problems.Add($"{where} must be a mapping");
                        continue;
                    }

                    var sm = Map(sliceMap, problems, where);
                    foreach (var k in sm.Keys.Except(new[] { "sources", "parameters" })) problems.Add($"{where}: unknown key '{k}'");
                    var own = sm.TryGetValue("parameters", out var pn) ? ReadSettings(pn, where + ".parameters", ModelKeys.Concat(MergeKeys).ToArray(), problems, seen, null) : new();
                    var sources = new List<MergeModelEntry>();
                    if (sm.TryGetValue("sources", out var sn) && sn is YamlSequenceNode { Children.Count: > 0 } srcList)
                    {
                        for (int i = 0; i < srcList.Children.Count; i++)
                        {
                            if (Source(srcList.Children[i], $"{where}.sources[{i}]", true, own) is { } entry) sources.Add(entry);
                        }
                    }
                    else
                    {
                        problems.Add($"{where}: sources must be a list of {{model, layer_range}}");
                    }

                    slices.Add(new MergeSlice(sources, Chain(own, global)));
                }
            }

            listed.AddRange(slices.Count > 0 ? slices[0].Sources : Array.Empty<MergeModelEntry>());
        }
        else if (!top.TryGetValue("models", out var ms) || ms is not YamlSequenceNode seq)
        {
            problems.Add("models must be a list of {model: ..., parameters: ...}");
        }
        else
        {
            var none = new Dictionary<string, List<MergeSetting>>();
            for (int i = 0; i < seq.Children.Count; i++)
            {
                if (Source(seq.Children[i], $"models[{i}]", false, none) is { } entry) listed.Add(entry);
            }

            // mergekit's planner appends a base_model that is not listed as one more whole-model source.
            var sources = new List<MergeModelEntry>(listed);
            if (baseModel != null && method != MergeMethod.Linear && listed.All(e => e.Model != baseModel))
            {
                sources.Add(new MergeModelEntry(baseModel, Chain(none, none, global)));
            }

            slices.Add(new MergeSlice(sources, Chain(none, global)));
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

        bool known = Methods.ContainsKey(methodName);
        bool needsBase = method is not (MergeMethod.Linear or MergeMethod.Passthrough or MergeMethod.Karcher or MergeMethod.Nuslerp);
        if (known && needsBase && baseModel == null) problems.Add($"{methodName} needs a base_model");
        if (known)
        {
            var (numbers, switches) = OptionsOf(method);
            string options = numbers.Length + switches.Length == 0 ? "none" : string.Join(", ", numbers.Concat(switches));
            foreach (var (where, key) in seen.Concat(flags.Keys.Select(k => ("parameters", k))).Distinct())
            {
                if (!numbers.Contains(key) && !switches.Contains(key)) problems.Add($"{where}: {methodName} takes no {key} (its options: {options})");
            }
        }

        // mergekit's registry: normalize defaults to true for linear, ties and della, false for the others.
        bool normalizeDefault = method is MergeMethod.Linear or MergeMethod.Ties or MergeMethod.Della;
        var lambda = global.TryGetValue("lambda", out var le) && le is [{ Filter: null, Values: [float l] }] ? l : 1f;
        var config = new MergeConfig(method, baseModel, listed, Flag("normalize", normalizeDefault), lambda, dtype, One("lines_alpha"), One("lines_beta"));
        string? tokenizerSource = top.TryGetValue("tokenizer_source", out var ts) ? ScalarOf(ts, "tokenizer_source", problems) : null;
        if (tokenizerSource == "union") problems.Add("tokenizer_source 'union' (a merged vocabulary) is not supported; use base or a model path");
        if (tokenizerSource == "base" && baseModel == null) problems.Add("tokenizer_source 'base' needs a base_model");
        config = config with
        {
            TokenizerSource = tokenizerSource, Rescale = Flag("rescale", TaskVectorMerge.DefaultRescale(method)), Slices = slices,
            Settings = global.ToDictionary(kv => kv.Key, kv => (IReadOnlyList<MergeSetting>)kv.Value),
            FilterWise = Flag("filter_wise", false), NuslerpFlatten = Flag("nuslerp_flatten", true), NuslerpRowWise = Flag("nuslerp_row_wise", false),
        };
        Flag("int8_mask", false); // a memory setting in mergekit; the result does not depend on it
        if (known) CheckSources(config, methodName, top.ContainsKey("slices"), problems);
        if (config.LinesAlpha.HasValue != config.LinesBeta.HasValue) problems.Add("lines_alpha and lines_beta go together");
        if (problems.Count > 0) throw new PeftSharpInputException($"{source}: {string.Join("; ", problems)}");
        return config;
    }

    /// <summary>What each method needs of a slice's sources (mergekit refuses the same configs, most of them only mid-merge).</summary>
    private static void CheckSources(MergeConfig c, string methodName, bool sliced, List<string> problems)
    {
        for (int s = 0; s < c.Slices.Count; s++)
        {
            var sources = c.Slices[s].Sources;
            string where = sliced ? $"slices[{s}]: " : "";
            var others = sources.Select(e => e.Model).Where(m => m != c.BaseModel).Distinct().ToList();
            bool hasBase = c.BaseModel != null && sources.Any(e => e.Model == c.BaseModel);
            if (sliced && c.BaseModel != null && !hasBase && c.Method is not (MergeMethod.Linear or MergeMethod.Passthrough))
            {
                problems.Add($"{where}the base_model '{c.BaseModel}' is not among its sources (mergekit takes the base's tensors from each slice's sources)");
            }

            switch (c.Method)
            {
                case MergeMethod.Passthrough when sources.Count != 1:
                    problems.Add($"{where}passthrough copies exactly one source per slice; this one has {sources.Count} ({string.Join(", ", sources.Select(e => e.Model))})");
                    break;
                case MergeMethod.Slerp:
                    if (!c.Slices[s].Settings.ContainsKey("t")) problems.Add("slerp needs parameters.t");
                    if (c.BaseModel != null && others.Count != 1) problems.Add($"{where}slerp interpolates between two models: the base_model and one other");
                    break;
                case MergeMethod.ModelStock when others.Count < 2:
                    problems.Add($"{where}model_stock needs the base_model and at least two other models");
                    break;
                case MergeMethod.Nuslerp:
                    if (others.Count != 2) problems.Add($"{where}nuslerp interpolates exactly two models besides the base_model; given {others.Count}");
                    foreach (var e in sources.Where(e => e.Model != c.BaseModel && !e.Settings.ContainsKey("weight")))
                    {
                        problems.Add($"{where}nuslerp needs a weight for {e.Model}");
                    }

                    break;
                case MergeMethod.Breadcrumbs or MergeMethod.BreadcrumbsTies when sources.Any(m => m.Parameters.Gamma == 0f && m.Parameters.Density < 1f):
                    problems.Add("gamma 0 with density < 1: mergekit's magnitude_outliers then keeps no entry (its slice [n_bot:-0] is empty); use ties for a plain " +
                        "magnitude trim, or gamma > 0");
                    break;
            }
        }
    }

    /// <summary>Each parameter's entries from every level, the first level's first.</summary>
    private static Dictionary<string, IReadOnlyList<MergeSetting>> Chain(params Dictionary<string, List<MergeSetting>>[] levels) =>
        levels.SelectMany(l => l.Keys).Distinct().ToDictionary(k => k, k => (IReadOnlyList<MergeSetting>)levels.SelectMany(l => l.GetValueOrDefault(k) ?? new()).ToList());

    /// <summary>
    /// A parameters mapping: numbers in <paramref name="numbers"/> (a number, a gradient, or {filter, value} entries);
    /// switches into <paramref name="flags"/> where given (the top level), else refused; each key seen is noted for the
    /// method's check.
    /// </summary>
    private static Dictionary<string, List<MergeSetting>> ReadSettings(YamlNode n, string where, string[] numbers, List<string> problems,
        List<(string, string)> seen, Dictionary<string, string>? flags)
    {
        var result = new Dictionary<string, List<MergeSetting>>();
        if (n is not YamlMappingNode m)
        {
            problems.Add($"{where} must be a mapping");
            return result;
        }

        foreach (var (k, v) in Map(m, problems, where))
        {
            if (FlagKeys.Contains(k))
            {
                if (flags == null) problems.Add($"{where}.{k}: {k} is a switch for the whole merge; give it under the top-level parameters");
                else if (v is YamlScalarNode s) flags[k] = s.Value ?? "";
                else problems.Add($"{where}.{k} must be true or false");
            }
            else if (MergeKeys.Contains(k) && !numbers.Contains(k))
            {
                problems.Add($"{where}.{k}: {k} applies to the whole merge and mergekit does not read it from a model's parameters; give it under the slice's " +
                    "or the top-level parameters");
            }
            else if (!numbers.Contains(k))
            {
                problems.Add($"{where}: option '{k}' is not supported");
            }
            else
            {
                seen.Add((where, k));
                if (ReadValue(v, $"{where}.{k}", problems) is { } entries) result[k] = entries;
            }
        }

        return result;
    }

    /// <summary>A parameter's value: a number, a gradient list, or a list of {filter, value} entries whose values are either.</summary>
    private static List<MergeSetting>? ReadValue(YamlNode node, string where, List<string> problems)
    {
        float[]? Values(YamlNode n, string at)
        {
            if (n is YamlScalarNode s)
            {
                if (float.TryParse(s.Value, NumberStyles.Float, CultureInfo.InvariantCulture, out float v) && float.IsFinite(v)) return new[] { v };
                problems.Add($"{at} '{s.Value}' is not a finite number");
                return null;
            }
            else if (n is YamlSequenceNode list && list.Children.Count > 0 && list.Children.All(c => c is YamlScalarNode))
            {
                var vs = list.Children.Select(c => float.TryParse(((YamlScalarNode)c).Value, NumberStyles.Float, CultureInfo.InvariantCulture, out float v) && float.IsFinite(v) ? v : float.NaN)
                    .ToArray();
                if (vs.All(float.IsFinite)) return vs;
            }

            problems.Add($"{at} must be a finite number, a list of them, or a list of {{filter, value}} entries");
            return null;
        }

        if (node is YamlSequenceNode seq && seq.Children.Count > 0 && seq.Children.All(c => c is YamlMappingNode))
        {
            var result = new List<MergeSetting>();
            int i = 0;
            foreach (YamlMappingNode entry in seq.Children)
            {
                string at = $"{where}[{i++}]";
                var e = Map(entry, problems, at);
                foreach (var k in e.Keys.Except(new[] { "filter", "value" })) problems.Add($"{at}: unknown key '{k}'");
                string? filter = e.TryGetValue("filter", out var f) ? ScalarOf(f, at + ".filter", problems) : null;
                if (e.TryGetValue("value", out var v) && Values(v, at + ".value") is { } vs) result.Add(new MergeSetting(filter, vs));
                else if (!e.ContainsKey("value")) problems.Add($"{at}: value is missing");
            }

            return result;
        }

        return Values(node, where) is { } one ? new List<MergeSetting> { new(null, one) } : null;
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
}
