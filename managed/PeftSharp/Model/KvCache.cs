using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// Keys and values of one sequence for every layer, (1, capacity, Hkv, D) each, after rotary embedding; the first
/// <see cref="Length"/> positions are filled. Generation appends to it one step at a time.
/// </summary>
public sealed class KvCache : IDisposable
{
    public KvCache(LlamaModel model, int capacity, KvCache? parent = null)
    {
        Parent = parent;
        var c = model.Config;
        if (capacity <= 0 || capacity > c.ContextLimit)
        {
            throw new ArgumentException($"KV cache capacity {capacity} must be in [1, {c.ContextLimitText}]");
        }

        ModelMemory.EnsureFits(model.Device, ModelMemory.KvCacheBytes(c, capacity), $"a KV cache of {capacity} positions");
        Capacity = capacity;
        Keys = Enumerable.Range(0, c.NumHiddenLayers).Select(i => model.Device.Zeros($"cache.{i}.k", 1, capacity, c.NumKeyValueHeads, c.HeadDim)).ToArray();
        Values = Enumerable.Range(0, c.NumHiddenLayers).Select(i => model.Device.Zeros($"cache.{i}.v", 1, capacity, c.NumKeyValueHeads, c.HeadDim)).ToArray();
    }

    public int Capacity { get; }

    /// <summary>
    /// A cache filled with given keys and values, one (P, Hkv, D) array per layer, already rotated: prefix tuning's
    /// virtual tokens as a shared prefix that sequences continue (a prefix-tuned variant in a mixed batch).
    /// </summary>
    public static KvCache FromValues(LlamaModel model, IReadOnlyList<float[]> keys, IReadOnlyList<float[]> values)
    {
        var c = model.Config;
        int row = c.NumKeyValueHeads * c.HeadDim;
        if (keys.Count != c.NumHiddenLayers || values.Count != c.NumHiddenLayers || keys[0].Length == 0 || keys[0].Length % row != 0)
        {
            throw new ArgumentException($"prefix keys and values must be {c.NumHiddenLayers} layers of (P, {c.NumKeyValueHeads}, {c.HeadDim})");
        }

        int p = keys[0].Length / row;
        var cache = new KvCache(model, p);
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            if (keys[l].Length != p * row || values[l].Length != p * row) throw new ArgumentException($"prefix layer {l}: keys and values must both be ({p}, {c.NumKeyValueHeads}, {c.HeadDim})");
            cache.Keys[l].CopyFrom(keys[l]);
            cache.Values[l].CopyFrom(values[l]);
        }

        cache.Length = p;
        return cache;
    }

    /// <summary>
    /// The shared prefix this cache continues (null: none). Its positions start after the parent chain's, and a
    /// sequence decoding into this cache attends to the whole chain, root first. Parents are read, never written.
    /// </summary>
    public KvCache? Parent { get; }

    /// <summary>This cache's ancestors, root first.</summary>
    public IEnumerable<KvCache> Chain
    {
        get
        {
            var list = new List<KvCache>();
            for (var p = Parent; p != null; p = p.Parent) list.Add(p);
            list.Reverse();
            return list;
        }
    }

    /// <summary>Positions filled so far.</summary>
    public int Length { get; internal set; }

    /// <summary>Forgets positions from <paramref name="length"/> on (rewinding a generation); their slots are reused.</summary>
    public void Truncate(int length)
    {
        if (length < 0 || length > Length) throw new ArgumentException($"cannot truncate a KV cache of length {Length} to {length}");
        Length = length;
    }

    internal Tensor[] Keys { get; }

    internal Tensor[] Values { get; }

    public void Dispose()
    {
        foreach (var t in Keys.Concat(Values)) t.Dispose();
    }
}
