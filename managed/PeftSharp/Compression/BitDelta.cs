using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Compression;

/// <summary>
/// A fine-tune stored as its difference from a base model (BitDelta): every linear weight's delta as sign bits packed
/// 32 to a word plus one fp32 scale (mean |delta|, the L2-optimal scale for a sign matrix), optionally refined over
/// residual rounds; every other parameter (embeddings, norms, LM head) kept as it is, and stored only when it differs
/// from the base. A fingerprint of the base weights travels with it, so it cannot be applied to another base.
/// </summary>
public sealed class BitDelta : IVariant
{
    public const string ConfigFile = "bitdelta_config.json";
    public const string WeightsFile = "bitdelta.safetensors";
    public const string Method = "bitdelta";

    public BitDelta(IReadOnlyDictionary<string, BitDeltaModule> modules, IReadOnlyDictionary<string, float[]> dense, string baseFingerprint)
    {
        Modules = modules;
        Dense = dense;
        BaseFingerprint = baseFingerprint;
    }

    /// <summary>Linear module path (model.layers.0.self_attn.q_proj) to its packed delta.</summary>
    public IReadOnlyDictionary<string, BitDeltaModule> Modules { get; }

    /// <summary>Full values of the non-linear parameters that differ from the base, by Hugging Face name.</summary>
    public IReadOnlyDictionary<string, float[]> Dense { get; }

    /// <summary>SHA-256 of the base model's parameters (see <see cref="Fingerprint"/>).</summary>
    public string BaseFingerprint { get; }

    public int Rounds => Modules.Count == 0 ? 0 : Modules.Values.Max(m => m.Rounds);

    /// <summary>Bytes of the packed signs and scales.</summary>
    public long PackedBytes => Modules.Values.Sum(m => m.Signs.Sum(s => s.Length * 4L) + m.Scales.Length * 4L);

    /// <summary>Bytes of the parameters kept dense (fp32).</summary>
    public long DenseBytes => Dense.Values.Sum(d => d.Length * 4L);

    /// <summary>
    /// SHA-256 over every parameter's name, shape and fp32 bytes, in checkpoint order: the same weights give the same
    /// fingerprint on every device and from every file precision that decodes to them.
    /// </summary>
    public static string Fingerprint(LlamaModel model)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var p in model.Parameters)
        {
            sha.AppendData(Encoding.UTF8.GetBytes($"{p.Name}[{string.Join(",", p.Value.Shape)}]"));
            var values = p.Value.ToArray();
            var bytes = new byte[values.Length * 4];
            Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length);
            sha.AppendData(bytes);
        }

        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>
    /// Compresses <paramref name="fine"/> against <paramref name="baseModel"/>: for each linear weight and each of
    /// <paramref name="rounds"/> rounds, S = sign(residual) and scale = mean(|residual|), residual -= scale S
    /// (the first residual is the delta itself).
    /// </summary>
    public static BitDelta Compress(LlamaModel baseModel, LlamaModel fine, int rounds = 1)
    {
        if (rounds < 1) throw new ArgumentException($"rounds {rounds} must be at least 1");
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        var linear = LoraAdapterConfig.LlamaLinearModules(baseModel.Config).ToHashSet();
        var modules = new Dictionary<string, BitDeltaModule>();
        var dense = new Dictionary<string, float[]>();
        foreach (var p in baseModel.Parameters)
        {
            var b = p.Value.ToArray();
            var f = fine[p.Name].Value.ToArray();
            string module = p.Name.EndsWith(".weight", StringComparison.Ordinal) ? p.Name[..^".weight".Length] : p.Name;
            if (!linear.Contains(module))
            {
                if (!b.AsSpan().SequenceEqual(f)) dense[p.Name] = f;
                continue;
            }

            int n = p.Value.Dim(0), k = p.Value.Dim(1);
            var residual = new float[b.Length];
            for (int i = 0; i < b.Length; i++) residual[i] = f[i] - b[i];
            var signs = new List<int[]>();
            var scales = new float[rounds];
            for (int r = 0; r < rounds; r++)
            {
                double abs = 0;
                foreach (float d in residual) abs += Math.Abs(d);
                float scale = (float)(abs / Math.Max(1, residual.Length));
                var words = BitDeltaReference.Pack(residual, n, k);
                for (int i = 0; i < residual.Length; i++) residual[i] -= residual[i] > 0 ? scale : -scale;
                signs.Add(words);
                scales[r] = scale;
            }

            modules[module] = new BitDeltaModule(signs, scales);
        }

        return new BitDelta(modules, dense, Fingerprint(baseModel));
    }

    /// <summary>Throws unless <paramref name="model"/> is the base this delta was made from.</summary>
    public void CheckBase(LlamaModel model, string what) => CheckFingerprint(BaseFingerprint, Fingerprint(model), what);

    /// <summary>The one check every delta kind makes: the base it was made from (expected) is the model at hand (actual).</summary>
    public static void CheckFingerprint(string expected, string actual, string what)
    {
        if (actual != expected)
        {
            throw new PeftSharpInputException($"{what} was made from a base with fingerprint {expected[..16]}..., but this model's is {actual[..16]}...: a delta only applies to its own base");
        }
    }

    /// <summary>Writes W += sum_j scale_j S_j into every linear weight and the dense parameters over the base's.</summary>
    public string Kind => "1-bit delta";

    public string Summary => $"{Modules.Count} 1-bit deltas ({Rounds} round{(Rounds == 1 ? "" : "s")}) and {Dense.Count} dense tensors";

    void IVariant.MergeInto(LlamaModel model) => MergeInto(model);

    public void MergeInto(LlamaModel model, IReadOnlyDictionary<string, float[]>? scales = null)
    {
        var ops = model.Device.Ops;
        foreach (var (module, m) in Modules)
        {
            var w = model[module + ".weight"].Value;
            using var pool = BitDeltaPool.Create(model.Device, w.Dim(1), w.Dim(0), new[] { m.ToPoolData(module) });
            ops.BitDeltaDecode(pool, 0, w, accumulate: true, scales: scales?[module]);
        }

        foreach (var (name, values) in Dense) model[name].Value.CopyFrom(values);
    }

    /// <summary>Writes bitdelta_config.json and bitdelta.safetensors (signs as I32 [rounds, N, W], scales F32 [rounds]).</summary>
    public void Save(string folder, LlamaConfig model)
    {
        Directory.CreateDirectory(folder);
        var tensors = new List<SafeTensorData>();
        foreach (var (module, m) in Modules.OrderBy(m => m.Key, StringComparer.Ordinal))
        {
            var (n, k) = PeftLoraAdapter.LinearShape(model, module);
            int w = BitDeltaShape.WordsPerRow(k);
            tensors.Add(SafeTensorData.Int32($"{module}.weight.signs", m.Signs.SelectMany(s => s).ToArray(), new[] { m.Rounds, n, w }));
            tensors.Add(new SafeTensorData($"{module}.weight.scales", m.Scales, new[] { m.Rounds }));
        }

        foreach (var (name, values) in Dense.OrderBy(d => d.Key, StringComparer.Ordinal))
        {
            var shape = LlamaModel.ParameterShapes(model).First(s => s.Name == name).Shape;
            tensors.Add(new SafeTensorData(name, values, shape));
        }

        SafeTensorsWriter.Write(Path.Combine(folder, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "peftsharp-bitdelta" });
        var o = new JsonObject
        {
            ["method"] = Method,
            ["rounds"] = Rounds,
            ["bit_order"] = "bit j of word w is input 32 w + j; 1 means +1",
            ["modules"] = JsonConfigFile.SortedNames(Modules.Keys),
            ["dense"] = JsonConfigFile.SortedNames(Dense.Keys),
            ["base_fingerprint"] = BaseFingerprint,
        };
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads a delta folder for <paramref name="baseModel"/>, checking its fingerprint and every tensor's shape.</summary>
    public static BitDelta Load(string folder, LlamaModel baseModel) =>
        InputGuard.Parse(folder, () => LoadCore(folder, baseModel));

    private static BitDelta LoadCore(string folder, LlamaModel baseModel)
    {
        string configPath = Path.Combine(folder, ConfigFile);
        var o = JsonConfigFile.Read(folder, ConfigFile, "1-bit delta (peft compress)");

        if (o["method"]?.Value<string>() != Method) throw new NotSupportedException($"{configPath}: method '{o["method"]}' is not {Method}");
        string fingerprint = JsonConfigFile.RequiredString(o, "base_fingerprint", configPath);
        var c = baseModel.Config;
        var linear = LoraAdapterConfig.LlamaLinearModules(c).ToHashSet();
        var shapes = LlamaModel.ParameterShapes(c).ToDictionary(s => s.Name, s => s.Shape);
        var problems = new List<string>();
        var modules = new Dictionary<string, BitDeltaModule>();
        var dense = new Dictionary<string, float[]>();
        using var file = SafeTensorsFile.Open(Path.Combine(folder, WeightsFile));
        foreach (var t in file.Tensors)
        {
            if (t.Name.EndsWith(".weight.signs", StringComparison.Ordinal))
            {
                string module = t.Name[..^".weight.signs".Length];
                if (!linear.Contains(module))
                {
                    problems.Add($"{t.Name} names no linear module of this model");
                    continue;
                }

                var (n, k) = PeftLoraAdapter.LinearShape(c, module);
                string scalesKey = module + ".weight.scales";
                if (t.DType != "I32" || t.Shape.Length != 3 || t.Shape[1] != n || t.Shape[2] != BitDeltaShape.WordsPerRow(k))
                {
                    problems.Add($"{t.Name} is {t.DType} {t.ShapeText}, expected I32 [rounds, {n}, {BitDeltaShape.WordsPerRow(k)}]");
                }
                else if (!file.Contains(scalesKey) || !file[scalesKey].Shape.SequenceEqual(new[] { t.Shape[0] }))
                {
                    problems.Add($"{scalesKey} is missing or not [{t.Shape[0]}]");
                }
                else
                {
                    var words = file.ReadInts(t.Name);
                    int per = n * BitDeltaShape.WordsPerRow(k);
                    var signs = Enumerable.Range(0, (int)t.Shape[0]).Select(r => words.AsSpan(r * per, per).ToArray()).ToArray();
                    modules[module] = new BitDeltaModule(signs, file.ReadFloats(scalesKey));
                }
            }
            else if (t.Name.EndsWith(".weight.scales", StringComparison.Ordinal))
            {
                if (!file.Contains(t.Name[..^".scales".Length] + ".signs")) problems.Add($"{t.Name} has no signs beside it");
            }
            else if (shapes.TryGetValue(t.Name, out var shape) && !linear.Contains(t.Name[..^".weight".Length]))
            {
                if (!t.Shape.SequenceEqual(shape.Select(d => (long)d))) problems.Add($"{t.Name} is {t.ShapeText}, expected [{string.Join(", ", shape)}]");
                else dense[t.Name] = file.ReadFloats(t.Name);
            }
            else
            {
                problems.Add($"{t.Name} matches no parameter of this model");
            }
        }

        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the delta does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        var delta = new BitDelta(modules, dense, fingerprint);
        delta.CheckBase(baseModel, folder);
        return delta;
    }
}
