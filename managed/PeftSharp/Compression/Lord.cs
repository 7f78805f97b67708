using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Compression;

/// <summary>
/// LoRD (Kaushal et al., 2023): one-shot low-rank decomposition of a model's own dense linear weights, W (out, in)
/// ~ B A with B = U_r S_r^1/2 (out, r) and A = S_r^1/2 V_r^T (r, in) from the top-r singular triplets (the best rank-r
/// approximation in Frobenius norm, Eckart-Young). The rank is a fraction of each weight's full rank min(out, in), or
/// one number for all; a weight whose factors would not be smaller than itself (r (out + in) &gt;= out x in) stays dense.
/// On disk: a Hugging Face folder's config.json and tokenizer files, with lord_config.json and lord.safetensors
/// (`{module}.lord_a` [r, in], `{module}.lord_b` [out, r] for each factored module, every other parameter under its
/// own name) in place of model.safetensors. <see cref="HuggingFaceFolder.Load"/> loads such a folder as a dense
/// model (W = B A): the file is smaller, the loaded model is the size and speed of a dense one (no factored forward).
/// </summary>
public sealed class LordModel
{
    public const string ConfigFile = "lord_config.json";
    public const string TensorFile = "lord.safetensors";

    /// <summary>Extra directions the randomized SVD carries past the rank kept.</summary>
    private const int Oversample = 10;

    private LordModel(LlamaConfig config, IReadOnlyDictionary<string, (float[] A, float[] B, int Rank)> factors, IReadOnlyDictionary<string, float[]> dense, double? rankRatio, int? rank)
    {
        Config = config;
        Factors = factors;
        Dense = dense;
        RankRatio = rankRatio;
        Rank = rank;
    }

    public LlamaConfig Config { get; }

    /// <summary>Each factored module (model.layers.0.mlp.down_proj): A (r, in), B (out, r) and its rank r.</summary>
    public IReadOnlyDictionary<string, (float[] A, float[] B, int Rank)> Factors { get; }

    /// <summary>Every other parameter, whole.</summary>
    public IReadOnlyDictionary<string, float[]> Dense { get; }

    /// <summary>The fraction of each weight's full rank kept, when the rank was given that way.</summary>
    public double? RankRatio { get; }

    /// <summary>The one rank every weight was cut to (at most its full rank), when given that way.</summary>
    public int? Rank { get; }

    /// <summary>The parameter count of the compressed form (factors and dense tensors).</summary>
    public long Parameters => Factors.Values.Sum(f => (long)f.A.Length + f.B.Length) + Dense.Values.Sum(v => (long)v.Length);

    /// <summary>The rank a weight of (out, in) gets: ceil(ratio x min(out, in)) (at least 1), or the told rank capped at min(out, in).</summary>
    public static int RankOf(int outF, int inF, double? rankRatio, int? rank) =>
        rankRatio is double f ? Math.Max(1, (int)Math.Ceiling(f * Math.Min(outF, inF))) : Math.Min(rank ?? throw new ArgumentException("LoRD: give a rank or a rank ratio"), Math.Min(outF, inF));

    /// <summary>Whether rank-r factors of an (out, in) weight hold fewer values than the weight.</summary>
    public static bool Saves(int outF, int inF, int r) => (long)r * (outF + inF) < (long)outF * inF;

    /// <summary>W (m, n) row-major as A (r, n) and B (m, r) with B A its best rank-r approximation; the singular values split evenly between them.</summary>
    public static (float[] A, float[] B) Factor(float[] w, int m, int n, int r)
    {
        if (r < 1 || r > Math.Min(m, n)) throw new ArgumentException($"LoRD rank {r}: must be in [1, {Math.Min(m, n)}] for a {m} x {n} weight");
        // Randomized SVD as Halko et al. run it: a few power iterations on r + 10 directions, the top r kept. The
        // Frobenius error is what LoRD needs, and it converges long before the individual vectors (60 iterations on r
        // directions took minutes a matrix at 576 x 1536).
        var (u, s, v) = Svd.Top(w, m, n, Math.Min(Math.Min(m, n), r + Oversample), seed: 11, iterations: 8);
        var a = new float[r * n];
        var b = new float[m * r];
        for (int j = 0; j < r; j++)
        {
            double root = Math.Sqrt(s[j]);
            for (int i = 0; i < n; i++) a[j * n + i] = (float)(root * v[i, j]);
            for (int i = 0; i < m; i++) b[i * r + j] = (float)(u[i, j] * root);
        }

        return (a, b);
    }

    /// <summary>
    /// Factors every linear weight of <paramref name="model"/> (or those of <paramref name="modules"/>) whose factors
    /// are smaller than it; give exactly one of <paramref name="rankRatio"/> (0, 1] and <paramref name="rank"/>.
    /// </summary>
    public static LordModel Compress(LlamaModel model, double? rankRatio = null, int? rank = null, IReadOnlyCollection<string>? modules = null)
    {
        if ((rankRatio == null) == (rank == null)) throw new ArgumentException("LoRD: give exactly one of a rank and a rank ratio");
        if (rankRatio is double f && !(f > 0 && f <= 1)) throw new ArgumentException($"LoRD rank ratio {f}: must be in (0, 1]");
        if (rank is < 1) throw new ArgumentException($"LoRD rank {rank}: must be at least 1");
        var linear = LoraAdapterConfig.LlamaLinearModules(model.Config).ToList();
        var chosen = modules?.ToList() ?? linear;
        var unknown = chosen.Where(m => !linear.Contains(m)).ToList();
        if (unknown.Count > 0) throw new ArgumentException($"LoRD: {string.Join(", ", unknown)} {(unknown.Count == 1 ? "is not a linear module" : "are not linear modules")} of this model");
        // Each module's SVD is independent and seeded: they run on every core, the result the same in any order.
        var work = new List<(string Module, float[] Values, int M, int N, int R)>();
        foreach (var module in chosen)
        {
            var w = model[module + ".weight"].Value;
            int m = w.Dim(0), n = w.Dim(1), r = RankOf(m, n, rankRatio, rank);
            if (Saves(m, n, r)) work.Add((module, w.ToArray(), m, n, r));
        }

        var done = new (float[], float[], int)[work.Count];
        Parallel.For(0, work.Count, i =>
        {
            var (a, b) = Factor(work[i].Values, work[i].M, work[i].N, work[i].R);
            done[i] = (a, b, work[i].R);
        });
        var factors = Enumerable.Range(0, work.Count).ToDictionary(i => work[i].Module, i => done[i]);

        var dense = model.Parameters.Where(p => !(ModuleOf(p.Name) is { } m && factors.ContainsKey(m))).ToDictionary(p => p.Name, p => p.Value.ToArray());
        return new LordModel(model.Config, factors, dense, rankRatio, rank);
    }

    /// <summary>The dense value of parameter <paramref name="name"/>: B A for a factored module's weight, else the stored tensor.</summary>
    public float[] Weight(string name)
    {
        if (Dense.TryGetValue(name, out var v)) return v;
        var (a, b, r) = Factors[ModuleOf(name) ?? throw new KeyNotFoundException($"LoRD model: no parameter {name}")];
        int m = b.Length / r, n = a.Length / r;
        // Row i of W accumulates b[i, k] a_k over k in order, in double, rounded once: the same sums as an element-by-
        // element loop, as vector updates of whole rows on every core (the element loop took 52 s to load a 180M model).
        var ad = new double[r * n];
        for (int t = 0; t < ad.Length; t++) ad[t] = a[t];
        var w = new float[m * n];
        Parallel.For(0, m, () => new double[n], (i, _, acc) =>
        {
            Array.Clear(acc);
            for (int k = 0; k < r; k++) System.Numerics.Tensors.TensorPrimitives.MultiplyAdd(ad.AsSpan(k * n, n), (double)b[i * r + k], acc, acc);
            for (int j = 0; j < n; j++) w[i * n + j] = (float)acc[j];
            return acc;
        }, _ => { });
        return w;
    }

    /// <summary>The module a weight belongs to (model.layers.0.mlp.down_proj for its .weight), or null for any other name.</summary>
    private static string? ModuleOf(string name) => name.EndsWith(".weight", StringComparison.Ordinal) ? name[..^".weight".Length] : null;

    /// <summary>Writes the folder (config.json, tokenizer files of <paramref name="source"/>, lord_config.json, lord.safetensors), each file atomically.</summary>
    public void Save(string folder, LlamaModel source, StorageType type = StorageType.F32)
    {
        Directory.CreateDirectory(folder);
        if (File.Exists(Path.Combine(folder, HuggingFaceFolder.SingleFile)) || File.Exists(Path.Combine(folder, HuggingFaceFolder.IndexFile)))
        {
            throw new IOException($"{folder} holds dense model weights ({HuggingFaceFolder.SingleFile}); write the LoRD model to a folder of its own");
        }

        var shapes = LlamaModel.ParameterShapes(Config).ToDictionary(s => s.Name, s => s.Shape);
        var tensors = new List<SafeTensorData>();
        foreach (var (module, (a, b, r)) in Factors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var shape = shapes[module + ".weight"];
            tensors.Add(new SafeTensorData(module + ".lord_a", a, new[] { r, shape[1] }, type));
            tensors.Add(new SafeTensorData(module + ".lord_b", b, new[] { shape[0], r }, type));
        }

        tensors.AddRange(Dense.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => new SafeTensorData(kv.Key, kv.Value, shapes[kv.Key], type)));
        SafeTensorsWriter.Write(Path.Combine(folder, TensorFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var config = new JsonObject
        {
            ["method"] = "lord",
            ["modules"] = new JsonObject(Factors.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value.Rank))),
        };
        if (RankRatio is double f) config["rank_ratio"] = f;
        if (Rank is int rr) config["rank"] = rr;
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        AtomicFile.WriteText(Path.Combine(folder, HuggingFaceFolder.ConfigFile), Config.ToJson());
        HfTokenizer.WriteFiles(folder, source.TokenizerFiles);
    }

    /// <summary>
    /// Reads a LoRD folder's tensors against <paramref name="config"/>: every factored module's factors at its recorded
    /// rank, every other parameter; missing, misshapen or unexpected tensors are one error naming the file.
    /// </summary>
    public static LordModel Read(string folder, LlamaConfig config)
    {
        var root = JsonConfigFile.Read(folder, ConfigFile, "LoRD model");
        string configPath = Path.Combine(folder, ConfigFile);
        if (JsonConfigFile.RequiredString(root, "method", configPath) != "lord") throw new PeftSharpInputException($"{configPath}: method is not \"lord\"");
        if (root["modules"] is not JsonObject moduleNode) throw new PeftSharpInputException($"{configPath}: no modules object");
        var linear = LoraAdapterConfig.LlamaLinearModules(config).ToHashSet();
        var shapes = LlamaModel.ParameterShapes(config).ToDictionary(s => s.Name, s => s.Shape);
        var ranks = new Dictionary<string, int>();
        foreach (var (module, node) in moduleNode)
        {
            if (!linear.Contains(module)) throw new PeftSharpInputException($"{configPath}: module {module} is not a linear module of a model of this config.json");
            int r = node?.Value<int>() ?? 0;
            var shape = shapes[module + ".weight"];
            if (r < 1 || r > Math.Min(shape[0], shape[1])) throw new PeftSharpInputException($"{configPath}: module {module} has rank {r}, outside [1, {Math.Min(shape[0], shape[1])}]");
            ranks[module] = r;
        }

        string path = Path.Combine(folder, TensorFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: {ConfigFile} without {TensorFile}", path);
        using var file = SafeTensorsFile.Open(path);
        var problems = new List<string>();
        var factors = new Dictionary<string, (float[], float[], int)>();
        var dense = new Dictionary<string, float[]>();
        var expected = new HashSet<string>();
        foreach (var (module, r) in ranks)
        {
            var shape = shapes[module + ".weight"];
            expected.Add(module + ".lord_a");
            expected.Add(module + ".lord_b");
            var a = file.ReadFloats(module + ".lord_a", new long[] { r, shape[1] }, problems, $"rank {r} in {ConfigFile}");
            var b = file.ReadFloats(module + ".lord_b", new long[] { shape[0], r }, problems, $"rank {r} in {ConfigFile}");
            if (a != null && b != null) factors[module] = (a, b, r);
        }

        foreach (var (name, shape) in shapes)
        {
            if (ModuleOf(name) is { } m && ranks.ContainsKey(m)) continue;
            expected.Add(name);
            var v = file.ReadFloats(name, shape.Select(d => (long)d).ToArray(), problems);
            if (v != null) dense[name] = v;
        }

        problems.AddRange(file.Tensors.Select(t => t.Name).Where(n => !expected.Contains(n)).Select(n => $"unexpected tensor {n}"));
        if (problems.Count > 0) throw new PeftSharpInputException($"{path}: does not match {ConfigFile} and config.json ({problems.Count} problems): {string.Join("; ", problems)}");
        return new LordModel(config, factors, dense, root["rank_ratio"]?.Value<double>(), root["rank"]?.Value<int>());
    }
}
