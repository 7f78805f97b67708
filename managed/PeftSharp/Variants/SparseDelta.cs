using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Compression;
using PeftSharp.Formats;
using PeftSharp.Model;


namespace PeftSharp.Variants;

/// <summary>
/// A fine-tune stored as sparse differences from its base: per parameter, distinct flat indices and the values to
/// add there; a fingerprint of the base it applies to. Deltas compose by addition (the union of their entries,
/// values summed where both have one). On disk: sparse_config.json and sparse_delta.safetensors with
/// `{name}.indices` (I32) and `{name}.values` (F32) per parameter.
/// </summary>
public sealed class SparseDelta : IVariant
{
    public const string ConfigFile = "sparse_config.json";
    public const string WeightsFile = "sparse_delta.safetensors";

    public SparseDelta(IReadOnlyDictionary<string, (int[] Index, float[] Values)> entries, string baseFingerprint)
    {
        Entries = entries;
        BaseFingerprint = baseFingerprint;
    }

    public IReadOnlyDictionary<string, (int[] Index, float[] Values)> Entries { get; }

    public string BaseFingerprint { get; }

    /// <summary>How the entries were chosen, written as the folder's "method": "sparse" (a sparse fine-tune or a masked difference) or "compeft" (ternary values).</summary>
    public string Method { get; init; } = "sparse";

    public long Nonzeros => Entries.Values.Sum(e => (long)e.Index.Length);

    public string Kind => "sparse delta";

    public string Summary => $"a sparse delta of {Nonzeros:N0} entries over {Entries.Count} tensors";

    /// <summary>Adds the entries to the model's weights (<see cref="ApplyTo"/> with sign +1).</summary>
    public void MergeInto(LlamaModel model) => ApplyTo(model);

    /// <summary>The entries where <paramref name="fine"/> differs from <paramref name="baseModel"/>, or those in <paramref name="masks"/>.</summary>
    public static SparseDelta Between(LlamaModel baseModel, LlamaModel fine, IReadOnlyDictionary<string, int[]>? masks = null)
    {
        var entries = new Dictionary<string, (int[], float[])>();
        foreach (var p in baseModel.Parameters)
        {
            var b = p.Value.ToArray();
            var f = fine[p.Name].Value.ToArray();
            var idx = masks != null
                ? (masks.TryGetValue(p.Name, out var m) ? m.OrderBy(i => i).ToArray() : Array.Empty<int>())
                : Enumerable.Range(0, b.Length).Where(i => f[i] != b[i]).ToArray();
            if (idx.Length > 0) entries[p.Name] = (idx, idx.Select(i => f[i] - b[i]).ToArray());
        }

        return new SparseDelta(entries, BitDelta.Fingerprint(baseModel));
    }

    /// <summary>The sum of two deltas of one base.</summary>
    public SparseDelta Add(SparseDelta other)
    {
        if (other.BaseFingerprint != BaseFingerprint) throw new ArgumentException("sparse deltas of different bases do not compose");
        var entries = new Dictionary<string, (int[], float[])>();
        foreach (var name in Entries.Keys.Union(other.Entries.Keys))
        {
            var sum = new SortedDictionary<int, double>();
            foreach (var d in new[] { this, other })
            {
                if (!d.Entries.TryGetValue(name, out var e)) continue;
                for (int j = 0; j < e.Index.Length; j++) sum[e.Index[j]] = sum.GetValueOrDefault(e.Index[j]) + e.Values[j];
            }

            entries[name] = (sum.Keys.ToArray(), sum.Values.Select(v => (float)v).ToArray());
        }

        return new SparseDelta(entries, BaseFingerprint);
    }

    /// <summary>W[idx] += sign * values for every parameter (apply with +1, remove with -1), on the model's device.</summary>
    public void ApplyTo(LlamaModel model, float sign = 1f)
    {
        foreach (var (name, (index, values)) in Entries)
        {
            var w = model[name].Value;
            using var idx = model.Device.FromIndices(name + ".indices", index);
            using var val = model.Device.FromArray(name + ".values", values, values.Length);
            model.Device.Ops.ScatterAdd(w, idx, val, sign);
        }
    }

    public void Save(string folder, LlamaConfig config)
    {
        Directory.CreateDirectory(folder);
        var tensors = new List<SafeTensorData>();
        foreach (var (name, (index, values)) in Entries.OrderBy(e => e.Key, StringComparer.Ordinal))
        {
            tensors.Add(SafeTensorData.Int32(name + ".indices", index, new[] { index.Length }));
            tensors.Add(new SafeTensorData(name + ".values", values, new[] { values.Length }));
        }

        SafeTensorsWriter.Write(Path.Combine(folder, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "peftsharp-sparse" });
        var o = new JsonObject
        {
            ["method"] = Method,
            ["nonzeros"] = Nonzeros,
            ["parameters"] = JsonConfigFile.SortedNames(Entries.Keys),
            ["base_fingerprint"] = BaseFingerprint,
        };
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads a sparse delta folder for <paramref name="baseModel"/>: fingerprint, names, index ranges and sizes checked.</summary>
    public static SparseDelta Load(string folder, LlamaModel baseModel) =>
        InputGuard.Parse(folder, () => LoadCore(folder, baseModel));

    private static SparseDelta LoadCore(string folder, LlamaModel baseModel)
    {
        string configPath = Path.Combine(folder, ConfigFile);
        var o = JsonConfigFile.Read(folder, ConfigFile, "sparse delta");

        string fingerprint = JsonConfigFile.RequiredString(o, "base_fingerprint", configPath);
        using var file = SafeTensorsFile.Open(Path.Combine(folder, WeightsFile));
        var problems = new List<string>();
        var entries = new Dictionary<string, (int[], float[])>();
        foreach (var t in file.Tensors.Where(t => t.Name.EndsWith(".indices", StringComparison.Ordinal)))
        {
            string name = t.Name[..^".indices".Length];
            if (!baseModel.Has(name))
            {
                problems.Add($"{name} is not a parameter of this model");
                continue;
            }

            if (!file.Contains(name + ".values") || file[name + ".values"].Elements != t.Elements)
            {
                problems.Add($"{name}.values is missing or not [{t.Elements}]");
                continue;
            }

            var idx = file.ReadInts(t.Name);
            int numel = baseModel[name].Value.Length;
            if (idx.Any(i => i < 0 || i >= numel) || idx.Distinct().Count() != idx.Length) problems.Add($"{name}.indices has entries outside [0, {numel}) or repeated");
            else entries[name] = (idx, file.ReadFloats(name + ".values"));
        }

        foreach (var t in file.Tensors.Where(t => !t.Name.EndsWith(".indices", StringComparison.Ordinal) && !t.Name.EndsWith(".values", StringComparison.Ordinal)))
        {
            problems.Add($"{t.Name} is not an indices/values tensor");
        }

        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the sparse delta does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        BitDelta.CheckFingerprint(fingerprint, BitDelta.Fingerprint(baseModel), folder);
        string method = o["method"]?.Value<string>() ?? "sparse";
        if (method is not ("sparse" or "compeft")) throw new PeftSharpInputException($"{configPath}: method '{method}' is not sparse or compeft");
        return new SparseDelta(entries, fingerprint) { Method = method };
    }
}
