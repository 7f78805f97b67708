using PeftSharp.Compression;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Serving;

/// <summary>
/// Named variants of one base model, served together: each variant is a LoRA adapter, a 1-bit delta or a sparse
/// delta over the shared base weights. For every linear module the variants that touch it live in one device pool per kind, so a
/// batch whose rows belong to different variants runs each layer as one base matmul plus one mixed launch per kind
/// (the 1-bit product reads the packed sign words directly). Index -1 is the base model.
/// Thread-safe: registering, binding and disposing take the model's generation lock (<see cref="LlamaModel.GenerationLock"/>),
/// which <see cref="BatchGenerator"/> holds for a whole generation, so a variant added from one thread never rebuilds
/// the pools under another thread's batch; a disposed set refuses further use.
/// </summary>
public sealed class VariantSet : IDisposable
{
    private readonly List<(string Name, PeftLoraAdapter? Lora, BitDelta? Delta, SparseDelta? Sparse)> variants = new();
    private readonly Dictionary<string, ModulePools> pools = new();
    private readonly Dictionary<int, KvCache> prefixes = new();
    /// <summary>Per-output and per-input scales by module of the variants that rescale (IA3, SSF), by variant index.</summary>
    private readonly Dictionary<int, (IReadOnlyDictionary<string, float[]> Output, IReadOnlyDictionary<string, float[]> Input)> scales = new();
    private readonly Dictionary<(int Variant, string Parameter), Tensor> replacements = new();
    private bool dirty = true;
    private bool disposed;

    public VariantSet(LlamaModel model)
    {
        Model = model;
    }

    public LlamaModel Model { get; }

    /// <summary>The base's fingerprint, hashed once for every delta registered (the served base does not change).</summary>
    private string BaseFingerprint => baseFingerprint ??= BitDelta.Fingerprint(Model);

    private string? baseFingerprint;

    public int Count => variants.Count;

    public IReadOnlyList<string> Names => variants.Select(v => v.Name).ToArray();

    /// <summary>Registers any variant (a <see cref="VariantFolder.Load"/> result) under <paramref name="name"/>; returns its index.</summary>
    public int Add(string name, IVariant variant) => variant switch
    {
        PeftLoraAdapter lora => AddLora(name, lora),
        PeftPrefixAdapter prefix => AddPrefix(name, prefix),
        PeftIa3Adapter vectors => AddIa3(name, vectors),
        PeftLnTuningAdapter norms => AddNorms(name, norms),
        SsfAdapter ssf => AddSsf(name, ssf),
        BitDelta delta => AddDelta(name, delta),
        SparseDelta sparse => AddSparse(name, sparse),
        _ => throw new NotSupportedException($"variant '{name}': a {variant.Kind} cannot be served in a mixed batch"),
    };

    /// <summary>
    /// Registers an IA3 adapter as a variant; returns its index. Its rows scale the outputs (or a feedforward module's
    /// inputs) of the shared products; where an output-scaled module has a bias, the row's bias is scaled with it, as
    /// PEFT computes (W x + b) * l.
    /// </summary>
    public int AddIa3(string name, PeftIa3Adapter adapter) => Guarded(() =>
    {
        CheckName(name);
        variants.Add((name, null, null, null));
        int index = variants.Count - 1;
        scales[index] = (adapter.Vectors.Where(v => !adapter.Config.IsFeedForward(v.Key)).ToDictionary(v => v.Key, v => v.Value),
            adapter.Vectors.Where(v => adapter.Config.IsFeedForward(v.Key)).ToDictionary(v => v.Key, v => v.Value));
        foreach (var (module, l) in adapter.Vectors.Where(v => !adapter.Config.IsFeedForward(v.Key) && Model.Has(v.Key + ".bias")))
        {
            AddRowBias(index, module, b => b.Select((x, i) => x * l[i]).ToArray());
        }

        dirty = true;
        return index;
    });

    /// <summary>Registers an SSF adapter as a variant: its rows scale the modules' outputs and add their own bias (gamma b + beta); returns its index.</summary>
    public int AddSsf(string name, SsfAdapter adapter) => Guarded(() =>
    {
        CheckName(name);
        variants.Add((name, null, null, null));
        int index = variants.Count - 1;
        scales[index] = (adapter.Modules.ToDictionary(m => m.Key, m => m.Value.Scale), new Dictionary<string, float[]>());
        foreach (var module in adapter.Modules.Keys) AddRowBias(index, module, b => adapter.RowBias(module, b));

        dirty = true;
        return index;
    });

    /// <summary>Registers an LN tuning adapter as a variant (its rows use its own norm weights); returns its index.</summary>
    public int AddNorms(string name, PeftLnTuningAdapter adapter) => Guarded(() =>
    {
        CheckName(name);
        CheckReplaceable(name, adapter.Norms.Keys);
        variants.Add((name, null, null, null));
        foreach (var (parameter, values) in adapter.Norms) AddReplacement(variants.Count - 1, parameter, values);
        dirty = true;
        return variants.Count - 1;
    });

    /// <summary>Registers a LoRA adapter as a variant; returns its index.</summary>
    public int AddLora(string name, PeftLoraAdapter adapter) => Guarded(() => AddLoraLocked(name, adapter));

    private int AddLoraLocked(string name, PeftLoraAdapter adapter)
    {
        CheckName(name);
        CheckReplaceable(name, adapter.Saved.Keys);
        variants.Add((name, adapter, null, null));
        foreach (var (parameter, values) in adapter.Saved) AddReplacement(variants.Count - 1, parameter, values); // modules_to_save
        foreach (var (module, bias) in adapter.Biases)
        {
            float scale = adapter.Config.Scale(module);
            AddRowBias(variants.Count - 1, module, b => b.Select((x, i) => x + scale * bias[i]).ToArray()); // lora_bias: b + s b_B
        }
        dirty = true;
        return variants.Count - 1;
    }

    /// <summary>
    /// Registers a 1-bit delta as a variant; returns its index. The delta must have been made from this base. The
    /// embeddings, norms and LM head it keeps densely (a full fine-tune changes them) become that variant's own copies,
    /// which its rows use in the mixed batch (<see cref="IRowVariants.Replacement"/>).
    /// </summary>
    public int AddDelta(string name, BitDelta delta) => Guarded(() => AddDeltaLocked(name, delta));

    private int AddDeltaLocked(string name, BitDelta delta)
    {
        CheckName(name);
        BitDelta.CheckFingerprint(delta.BaseFingerprint, BaseFingerprint, $"1-bit delta '{name}'");
        CheckReplaceable(name, delta.Dense.Keys);
        variants.Add((name, null, delta, null));
        foreach (var (parameter, values) in delta.Dense) AddReplacement(variants.Count - 1, parameter, values);
        dirty = true;
        return variants.Count - 1;
    }

    /// <summary>The linear layers' weight names: what the mixed products serve per row (everything else is replaced whole).</summary>
    private HashSet<string> LinearWeights => linearWeights ??= LoraAdapterConfig.LlamaLinearModules(Model.Config).Select(m => m + ".weight").ToHashSet();

    private HashSet<string>? linearWeights;

    /// <summary>Parameters a variant may replace whole: everything that is not a linear layer's weight.</summary>
    private void CheckReplaceable(string name, IEnumerable<string> parameters)
    {
        foreach (var p in parameters)
        {
            if (LinearWeights.Contains(p) || !Model.Has(p)) throw new ArgumentException($"variant '{name}': {p} cannot be replaced per row (only embeddings, norms and the LM head are)");
        }
    }

    /// <summary>
    /// The variant's own bias on a linear module, from the module's bias (zeros where it has none, as Llama's): the
    /// linear layer adds it to that variant's rows after the products, on modules without a bias too.
    /// </summary>
    private void AddRowBias(int variant, string module, Func<float[], float[]> fromBase)
    {
        string parameter = module + ".bias";
        var values = fromBase(Model.Has(parameter) ? Model[parameter].Value.ToArray() : new float[PeftLoraAdapter.LinearShape(Model.Config, module).Out]);
        replacements[(variant, parameter)] = Model.Device.FromArray($"{variants[variant].Name}.{parameter}", values, values.Length);
    }

    private void AddReplacement(int variant, string parameter, float[] values)
    {
        var shape = Model[parameter].Value.Shape.ToArray();
        replacements[(variant, parameter)] = Model.Device.FromArray($"{variants[variant].Name}.{parameter}", values, shape);
    }

    /// <summary>The variant's own copy of a parameter (a norm, the embedding, the LM head), or null: the base's.</summary>
    public Tensor? ReplacementOf(int variant, string parameter) =>
        variant >= 0 && replacements.TryGetValue((variant, parameter), out var t) ? t : null;

    /// <summary>Whether any variant replaces a parameter (so batches need to look).</summary>
    internal bool HasReplacements => replacements.Count > 0;

    /// <summary>The index of a variant by name; null, "" and "base" are the base model (-1).</summary>
    public int IndexOf(string? name)
    {
        if (string.IsNullOrEmpty(name) || name == "base") return -1;
        int i = variants.FindIndex(v => v.Name == name);
        if (i < 0) throw new ArgumentException($"no variant named '{name}' (known: base{string.Concat(variants.Select(v => ", " + v.Name))})");
        return i;
    }

    /// <summary>
    /// Binds a batch: row r of every linear input belongs to variant <paramref name="rowVariants"/>[r] (-1: base).
    /// Rows of an activated LoRA (<see cref="InvocationOf"/>) are refused unless <paramref name="activationResolved"/>
    /// says the caller gave its positions before the invocation start to the base (-1), as
    /// <see cref="BatchGenerator"/> and <see cref="VariantServer"/> do.
    /// </summary>
    public RowVariantBatch Bind(IReadOnlyList<int> rowVariants, bool activationResolved = false) => Guarded(() => BindLocked(rowVariants, activationResolved));

    /// <summary>
    /// The invocation tokens of variant <paramref name="variant"/> when it is an activated LoRA (it adapts a sequence
    /// only from their last occurrence on: <see cref="LoraAdapterConfig.InvocationStart"/>); null otherwise.
    /// </summary>
    public IReadOnlyList<int>? InvocationOf(int variant) => Guarded(() => variant >= 0 && variant < variants.Count ? variants[variant].Lora?.Config.AloraInvocationTokens : null);

    /// <summary>
    /// Where variant <paramref name="variant"/> starts adapting a sequence of <paramref name="tokens"/>: 0 for the base
    /// and every variant but an activated LoRA, whose start is its invocation tokens' last occurrence (-1: absent).
    /// </summary>
    public int ActivationStart(int variant, IReadOnlyList<int> tokens) => Guarded(() =>
        variant >= 0 && variant < variants.Count && variants[variant].Lora is { } lora ? lora.Config.InvocationStart(tokens) : 0);

    /// <summary>
    /// <see cref="ActivationStart"/> for a sequence that must be adapted: an activated LoRA whose invocation tokens it
    /// lacks is refused (ArgumentException naming <paramref name="what"/>, the variant and the tokens).
    /// </summary>
    internal int RequireActivation(int variant, IReadOnlyList<int> tokens, string what)
    {
        int start = ActivationStart(variant, tokens);
        if (start < 0) throw new ArgumentException(BatchGenerator.NoInvocation(what, Names[variant], InvocationOf(variant)!));
        return start;
    }

    /// <summary>
    /// The variant of each of <paramref name="count"/> positions from <paramref name="first"/>: <paramref name="variant"/>
    /// from <paramref name="activeFrom"/> on, the base (-1) before it (an activated LoRA's; 0 adapts every position).
    /// </summary>
    internal static IEnumerable<int> ActivatedRows(int variant, int activeFrom, int first, int count) =>
        Enumerable.Range(first, count).Select(p => p >= activeFrom ? variant : -1);

    private RowVariantBatch BindLocked(IReadOnlyList<int> rowVariants, bool activationResolved)
    {
        foreach (int v in rowVariants)
        {
            if (v < -1 || v >= variants.Count) throw new ArgumentException($"variant index {v} is outside [-1, {variants.Count})");
        }

        if (!activationResolved && rowVariants.Distinct().FirstOrDefault(v => v >= 0 && variants[v].Lora?.Config.AloraInvocationTokens != null, -1) is int a and >= 0)
        {
            throw new NotSupportedException($"variant '{variants[a].Name}' is an activated LoRA: this pass would adapt every position, not only those from its invocation " +
                "tokens on; generate (BatchGenerator, VariantServer: peft generate --requests, peft serve) or evaluate (Evaluator: peft eval) with it, which give the earlier positions to the base");
        }

        if (dirty) Rebuild();
        return new RowVariantBatch(this, rowVariants.ToArray());
    }

    /// <summary>
    /// Registers a sparse delta as a variant; returns its index. It must have been made from this base. Entries on
    /// linear weights run through the mixed sparse product; entries on embeddings, norms or the LM head give the variant
    /// its own dense copy of that parameter (base plus the entries), which its rows use.
    /// </summary>
    public int AddSparse(string name, SparseDelta delta) => Guarded(() => AddSparseLocked(name, delta));

    private int AddSparseLocked(string name, SparseDelta delta)
    {
        CheckName(name);
        BitDelta.CheckFingerprint(delta.BaseFingerprint, BaseFingerprint, $"sparse delta '{name}'");
        var other = delta.Entries.Where(kv => !LinearWeights.Contains(kv.Key)).ToList();
        CheckReplaceable(name, other.Select(kv => kv.Key));
        variants.Add((name, null, null, delta));
        foreach (var (parameter, e) in other)
        {
            var values = Model[parameter].Value.ToArray();
            for (int j = 0; j < e.Index.Length; j++) values[e.Index[j]] += e.Values[j];
            AddReplacement(variants.Count - 1, parameter, values);
        }

        dirty = true;
        return variants.Count - 1;
    }

    /// <summary>
    /// Registers a prefix-tuning adapter as a variant; returns its index. Its virtual tokens become a shared prefix
    /// cache that the variant's sequences continue, so prefix-tuned rows batch with every other kind.
    /// </summary>
    public int AddPrefix(string name, PeftPrefixAdapter adapter) => Guarded(() => AddPrefixLocked(name, adapter));

    private int AddPrefixLocked(string name, PeftPrefixAdapter adapter)
    {
        CheckName(name);
        var cache = KvCache.FromValues(Model, adapter.Keys, adapter.Values);
        variants.Add((name, null, null, null));
        prefixes[variants.Count - 1] = cache;
        dirty = true;
        return variants.Count - 1;
    }

    /// <summary>
    /// Unregisters a variant and frees its device copies (pools are rebuilt at the next bind); variants after it move
    /// down one index, so callers that keep indices across a removal must look them up again by name.
    /// </summary>
    public void Remove(string name) => Guarded(() =>
    {
        int index = IndexOf(name);
        variants.RemoveAt(index);
        if (prefixes.Remove(index, out var prefix)) prefix.Dispose();
        foreach (var key in replacements.Keys.Where(k => k.Variant == index).ToList())
        {
            replacements[key].Dispose();
            replacements.Remove(key);
        }

        static Dictionary<TKey, TValue> Shift<TKey, TValue>(Dictionary<TKey, TValue> d, Func<TKey, int> indexOf, Func<TKey, int, TKey> with, int removed)
            where TKey : notnull => d.ToDictionary(kv => indexOf(kv.Key) > removed ? with(kv.Key, indexOf(kv.Key) - 1) : kv.Key, kv => kv.Value);
        var shiftedPrefixes = Shift(prefixes, k => k, (_, i) => i, index);
        scales.Remove(index);
        var shiftedScales = Shift(scales, k => k, (_, i) => i, index);
        var shiftedReplacements = Shift(replacements, k => k.Variant, (k, i) => (i, k.Parameter), index);
        prefixes.Clear();
        foreach (var kv in shiftedPrefixes) prefixes[kv.Key] = kv.Value;
        scales.Clear();
        foreach (var kv in shiftedScales) scales[kv.Key] = kv.Value;
        replacements.Clear();
        foreach (var kv in shiftedReplacements) replacements[kv.Key] = kv.Value;
        dirty = true;
        return 0;
    });

    /// <summary>The virtual-token prefix a variant's sequences continue, or null.</summary>
    public KvCache? PrefixOf(int variant) => variant >= 0 && prefixes.TryGetValue(variant, out var c) ? c : null;

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
            var loraSlots = new int[variants.Count];
            var deltaSlots = new int[variants.Count];
            var sparseSlots = new int[variants.Count];
            var doraSlots = new int[variants.Count];
            var doraScales = new List<float[]>();
            var outScaleSlots = new int[variants.Count];
            var inScaleSlots = new int[variants.Count];
            var outScales = new List<float[]>();
            var inScales = new List<float[]>();
            var lora = new List<LoraAdapterData>();
            var deltas = new List<BitDeltaData>();
            var sparse = new List<SparseDeltaData>();
            for (int v = 0; v < variants.Count; v++)
            {
                loraSlots[v] = deltaSlots[v] = sparseSlots[v] = doraSlots[v] = outScaleSlots[v] = inScaleSlots[v] = -1;
                if (scales.TryGetValue(v, out var scale))
                {
                    if (scale.Output.TryGetValue(module, out var sOut))
                    {
                        outScaleSlots[v] = outScales.Count;
                        outScales.Add(sOut);
                    }

                    if (scale.Input.TryGetValue(module, out var sIn))
                    {
                        inScaleSlots[v] = inScales.Count;
                        inScales.Add(sIn);
                    }
                }

                if (variants[v].Lora is { } adapter && adapter.Modules.TryGetValue(module, out var w))
                {
                    loraSlots[v] = lora.Count;
                    lora.Add(new LoraAdapterData(variants[v].Name, w.A, w.B, adapter.Config.For(module).Rank, adapter.Config.Scale(module)));
                    if (adapter.Magnitudes.TryGetValue(module, out var m))
                    {
                        doraSlots[v] = doraScales.Count;
                        doraScales.Add(DoraColumnScale(module, w.A, w.B, adapter.Config.For(module).Rank, adapter.Config.Scale(module), m));
                    }
                }

                if (variants[v].Delta is { } delta && delta.Modules.TryGetValue(module, out var d))
                {
                    deltaSlots[v] = deltas.Count;
                    deltas.Add(d.ToPoolData(variants[v].Name));
                }

                if (variants[v].Sparse is { } sd && sd.Entries.TryGetValue(module + ".weight", out var e))
                {
                    sparseSlots[v] = sparse.Count;
                    sparse.Add(new SparseDeltaData(variants[v].Name, e.Index, e.Values));
                }
            }

            if (lora.Count + deltas.Count + sparse.Count + outScales.Count + inScales.Count == 0) continue;
            pools[module] = new ModulePools(
                lora.Count > 0 ? LoraAdapterPool.Create(Model.Device, inF, outF, lora) : null, new SlotMap(loraSlots),
                deltas.Count > 0 ? BitDeltaPool.Create(Model.Device, inF, outF, deltas) : null, new SlotMap(deltaSlots),
                sparse.Count > 0 ? SparseDeltaPool.Create(Model.Device, inF, outF, sparse) : null, new SlotMap(sparseSlots))
            {
                DoraScales = doraScales.Count > 0 ? Model.Device.FromArray("dora scales", doraScales.SelectMany(x => x).ToArray(), doraScales.Count, outF) : null,
                DoraSlots = new SlotMap(doraSlots),
                OutputScales = outScales.Count > 0 ? Model.Device.FromArray("output scales", outScales.SelectMany(x => x).ToArray(), outScales.Count, outF) : null,
                OutputScaleSlots = new SlotMap(outScaleSlots),
                InputScales = inScales.Count > 0 ? Model.Device.FromArray("input scales", inScales.SelectMany(x => x).ToArray(), inScales.Count, inF) : null,
                InputScaleSlots = new SlotMap(inScaleSlots),
            };
        }

        dirty = false;
    }

    internal bool TryGetPools(string module, out ModulePools p) => pools.TryGetValue(module, out p!);

    /// <summary>DoRA's per-output factor m / ||W + s B A||_row for one module of one adapter (the norm a constant, as PEFT has it).</summary>
    private float[] DoraColumnScale(string module, float[] a, float[] b, int rank, float scale, float[] magnitude)
    {
        var w = Model[module + ".weight"].Value;
        using var ta = Model.Device.FromArray("a", a, rank, w.Dim(1));
        using var tb = Model.Device.FromArray("b", b, w.Dim(0), rank);
        return LoraMerge.MergedRowNorms(w, ta, tb, scale).Select((norm, r) => (float)(magnitude[r] / Math.Max(norm, 1e-12))).ToArray();
    }

    /// <summary>Runs <paramref name="body"/> under the model's generation lock, on a set that is not disposed.</summary>
    private T Guarded<T>(Func<T> body)
    {
        lock (Model.GenerationLock)
        {
            ObjectDisposedException.ThrowIf(disposed, this);
            return body();
        }
    }

    public void Dispose()
    {
        lock (Model.GenerationLock)
        {
            if (disposed) return;
            disposed = true;
            DisposeLocked();
        }
    }

    private void DisposeLocked()
    {
        foreach (var p in pools.Values) p.Dispose();
        pools.Clear();
        foreach (var c in prefixes.Values) c.Dispose();
        prefixes.Clear();
        foreach (var t in replacements.Values) t.Dispose();
        replacements.Clear();
    }

    /// <summary>Variant index to its slot in one pool (-1: none there), with a key that is equal for equal maps.</summary>
    internal sealed class SlotMap
    {
        public SlotMap(int[] slots)
        {
            Slots = slots;
            Key = string.Join(",", slots);
        }

        public int[] Slots { get; }

        /// <summary>Computed once: modules whose maps are equal share one row-slot tensor per batch.</summary>
        public string Key { get; }
    }

    internal sealed class ModulePools : IDisposable
    {
        public ModulePools(LoraAdapterPool? lora, SlotMap loraSlots, BitDeltaPool? delta, SlotMap deltaSlots, SparseDeltaPool? sparse, SlotMap sparseSlots)
        {
            Lora = lora;
            LoraSlots = loraSlots;
            Delta = delta;
            DeltaSlots = deltaSlots;
            Sparse = sparse;
            SparseSlots = sparseSlots;
        }

        public SparseDeltaPool? Sparse { get; }

        /// <summary>DoRA adapters' per-output factors (slots, N), and each variant's slot (-1: not DoRA here).</summary>
        public Tensor? DoraScales { get; init; }

        public SlotMap DoraSlots { get; init; } = new(Array.Empty<int>());

        /// <summary>Per-variant scales of outputs (slots, N: IA3, SSF) and inputs (slots, K: IA3 feedforward), with each variant's slot (-1: none here).</summary>
        public Tensor? OutputScales { get; init; }

        public SlotMap OutputScaleSlots { get; init; } = new(Array.Empty<int>());

        public Tensor? InputScales { get; init; }

        public SlotMap InputScaleSlots { get; init; } = new(Array.Empty<int>());

        /// <summary>Variant index to its slot in <see cref="Sparse"/> (-1: none here).</summary>
        public SlotMap SparseSlots { get; }

        public LoraAdapterPool? Lora { get; }

        /// <summary>Variant index to its slot in <see cref="Lora"/> (-1: the variant has no adapter here).</summary>
        public SlotMap LoraSlots { get; }

        public BitDeltaPool? Delta { get; }

        /// <summary>Variant index to its slot in <see cref="Delta"/> (-1: the variant has no 1-bit delta here).</summary>
        public SlotMap DeltaSlots { get; }

        public void Dispose()
        {
            Lora?.Dispose();
            Delta?.Dispose();
            Sparse?.Dispose();
            DoraScales?.Dispose();
            OutputScales?.Dispose();
            InputScales?.Dispose();
        }
    }
}
