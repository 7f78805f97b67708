using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>
/// Named variants of one base model, served together: each variant is a LoRA adapter (later also 1-bit and sparse
/// deltas) over the shared base weights. For every linear module the variants that touch it live in one device pool,
/// so a batch whose rows belong to different variants runs each layer as one base matmul plus one mixed-adapter
/// launch. Index -1 is the base model.
/// </summary>
public sealed class VariantSet : IDisposable
{
    private readonly List<(string Name, PeftLoraAdapter? Lora)> variants = new();
    private readonly Dictionary<string, ModulePools> pools = new();
    private bool dirty = true;

    public VariantSet(LlamaModel model)
    {
        Model = model;
    }

    public LlamaModel Model { get; }

    public int Count => variants.Count;

    public IReadOnlyList<string> Names => variants.Select(v => v.Name).ToArray();

    /// <summary>Registers a LoRA adapter as a variant; returns its index.</summary>
    public int AddLora(string name, PeftLoraAdapter adapter)
    {
        CheckName(name);
        variants.Add((name, adapter));
        dirty = true;
        return variants.Count - 1;
    }

    /// <summary>The index of a variant by name; null, "" and "base" are the base model (-1).</summary>
    public int IndexOf(string? name)
    {
        if (string.IsNullOrEmpty(name) || name == "base") return -1;
        int i = variants.FindIndex(v => v.Name == name);
        if (i < 0) throw new ArgumentException($"no variant named '{name}' (known: base{string.Concat(variants.Select(v => ", " + v.Name))})");
        return i;
    }

    /// <summary>Binds a batch: row r of every linear input belongs to variant <paramref name="rowVariants"/>[r] (-1: base).</summary>
    public RowVariantBatch Bind(IReadOnlyList<int> rowVariants)
    {
        foreach (int v in rowVariants)
        {
            if (v < -1 || v >= variants.Count) throw new ArgumentException($"variant index {v} is outside [-1, {variants.Count})");
        }

        if (dirty) Rebuild();
        return new RowVariantBatch(this, rowVariants.ToArray());
    }

    private void CheckName(string name)
    {
        if (string.IsNullOrWhiteSpace(name) || name == "base") throw new ArgumentException($"'{name}' cannot name a variant ('base' means no variant)");
        if (variants.Any(v => v.Name == name)) throw new ArgumentException($"a variant named '{name}' is already registered");
    }

    private void Rebuild()
    {
        foreach (var p in pools.Values) p.Dispose();
        pools.Clear();
        var c = Model.Config;
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(c))
        {
            var (outF, inF) = PeftLoraAdapter.LinearShape(c, module);
            var slots = new int[variants.Count];
            var data = new List<LoraAdapterData>();
            for (int v = 0; v < variants.Count; v++)
            {
                slots[v] = -1;
                if (variants[v].Lora is { } lora && lora.Modules.TryGetValue(module, out var w))
                {
                    slots[v] = data.Count;
                    data.Add(new LoraAdapterData(variants[v].Name, w.A, w.B, lora.Config.For(module).Rank, lora.Config.Scale(module)));
                }
            }

            if (data.Count > 0) pools[module] = new ModulePools(LoraAdapterPool.Create(Model.Device, inF, outF, data), slots);
        }

        dirty = false;
    }

    internal bool TryGetPools(string module, out ModulePools p) => pools.TryGetValue(module, out p!);

    public void Dispose()
    {
        foreach (var p in pools.Values) p.Dispose();
        pools.Clear();
    }

    internal sealed class ModulePools : IDisposable
    {
        public ModulePools(LoraAdapterPool lora, int[] loraSlots)
        {
            Lora = lora;
            LoraSlots = loraSlots;
            LoraKey = string.Join(",", loraSlots);
        }

        public LoraAdapterPool Lora { get; }

        /// <summary>Variant index to its slot in <see cref="Lora"/> (-1: the variant has no adapter here).</summary>
        public int[] LoraSlots { get; }

        /// <summary>Modules with the same slot map share one row-index tensor per batch.</summary>
        public string LoraKey { get; }

        public void Dispose() => Lora.Dispose();
    }
}

/// <summary>One batch's rows bound to their variants; per-row index tensors are built once per distinct slot map.</summary>
public sealed class RowVariantBatch : IRowVariants, IDisposable
{
    private readonly VariantSet set;
    private readonly int[] rowVariants;
    private readonly Dictionary<string, IndexTensor?> rowSlots = new();

    internal RowVariantBatch(VariantSet set, int[] rowVariants)
    {
        this.set = set;
        this.rowVariants = rowVariants;
    }

    public int Rows => rowVariants.Length;

    public void Apply(string module, Tensor x, Tensor y)
    {
        if (!set.TryGetPools(module, out var p)) return;
        if (!rowSlots.TryGetValue(p.LoraKey, out var idx))
        {
            var slots = rowVariants.Select(v => v < 0 ? -1 : p.LoraSlots[v]).ToArray();
            idx = slots.Any(s => s >= 0) ? set.Model.Device.FromIndices("row_adapters", slots) : null; // null: no row uses this pool
            rowSlots[p.LoraKey] = idx;
        }

        if (idx != null) set.Model.Device.Ops.LoraMixed(x, y, p.Lora, idx);
    }

    public void Dispose()
    {
        foreach (var t in rowSlots.Values) t?.Dispose();
        rowSlots.Clear();
    }
}
