using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// The LoRA family on one model: the model's own adapter (a <see cref="LoraLayer"/> or <see cref="DoraLayer"/> on
/// each targeted module), LoRA-GA's initial factors absorbed into the base, chain of LoRA's restarts, and the adapter
/// sets trained side by side in one batch. The layers sit on the model's linear modules, which run them.
/// </summary>
internal sealed class LoraAdapters
{
    private readonly LlamaModel model;
    private readonly Func<string, Linear> linear;
    private readonly Dictionary<string, LoraLayer> lora = new();
    private readonly Dictionary<string, (float[] A0, float[] B0)> loraInit = new();
    private readonly List<LoraSet> loraSets = new();
    private int chainRestarts;

    public LoraAdapters(LlamaModel model, Func<string, Linear> linear)
    {
        this.model = model;
        this.linear = linear;
    }

    /// <summary>The model's own LoRA layers by module path.</summary>
    public IReadOnlyDictionary<string, LoraLayer> Layers => lora;

    /// <summary>The adapter sets, in the order a set-batched loss takes its sequences.</summary>
    public IReadOnlyList<LoraSet> Sets => loraSets;

    /// <summary>Every LoRA parameter: the model's own layers', then each set's.</summary>
    public IEnumerable<Parameter> Parameters => lora.Values.SelectMany(l => l.Parameters).Concat(loraSets.SelectMany(s => s.Layers.Values.SelectMany(l => l.Parameters)));

    /// <summary>
    /// Adds one of several LoRA adapters trained in the same batch over the frozen base: each sequence of a batch
    /// belongs to one adapter (<see cref="LlamaModel.Loss(int[], int[], int, bool, IReadOnlyList{int})"/>), the base product runs
    /// once for all rows, and each adapter's low-rank path runs on its own contiguous rows (segments, as Punica's SGMV
    /// lays a batch out). Same initialisation as <see cref="Add"/>; DoRA is not supported here.
    /// </summary>
    public void AddSet(string name, LoraAdapterConfig config, int seed)
    {
        if (lora.Count > 0) throw new InvalidOperationException("the model has a single LoRA adapter; adapter sets and AddLora do not mix");
        if (config.UseDora) throw new NotSupportedException($"adapter set '{name}': DoRA in adapter sets is not supported (train DoRA adapters one at a time)");
        if (string.IsNullOrWhiteSpace(name) || loraSets.Any(s => s.Name == name)) throw new ArgumentException($"adapter set name '{name}' is empty or already used");
        var rng = new Random(seed);
        var layers = new Dictionary<string, LoraLayer>();
        foreach (var module in LoraTargets(config))
        {
            var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
            int r = config.For(module).Rank;
            layers[module] = NewLoraLayer($"{name}/", module, config, DefaultLoraA(rng, r, inF), new float[outF * r], magnitude: null, config.LoraBias ? new float[outF] : null);
        }

        loraSets.Add(new LoraSet(name, config, layers));
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(model.Config)) linear(module).AddSetAdapter(layers.GetValueOrDefault(module));
        foreach (var p in model.Parameters) p.Trainable = false;
    }

    /// <summary>One adapter of the set as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>).</summary>
    public PeftLoraAdapter ExportSet(string name)
    {
        var set = loraSets.FirstOrDefault(s => s.Name == name) ?? throw new ArgumentException($"no adapter set named '{name}' (have: {string.Join(", ", loraSets.Select(s => s.Name))})");
        return new(set.Config, set.Layers.ToDictionary(l => l.Key, l => (l.Value.A.Value.ToArray(), l.Value.B.Value.ToArray())), new Dictionary<string, float[]>(), null, Biases(set.Layers));
    }

    /// <summary>
    /// Adds a LoRA layer to every module <paramref name="config"/> targets: A (r, in) from PEFT's default init
    /// (uniform in +-1/sqrt(in), i.e. kaiming_uniform with a = sqrt(5)), B (out, r) zero, so the model is unchanged
    /// until B trains; with use_dora, a magnitude m = ||W||_row. Weights come from <paramref name="from"/> where it
    /// has them; with lora_bias, lora_B's bias starts at zero as PEFT's does. With <paramref name="freezeBase"/>, every base parameter stops training; with
    /// <paramref name="trainA"/> false, A stays at its random init and only B (and m) train.
    /// </summary>
    public void Add(LoraAdapterConfig config, int seed, bool freezeBase = true, PeftLoraAdapter? from = null, bool trainA = true)
    {
        if (from != null) LoraMerge.RefuseActivated(from, "trained from");
        if (from is { Saved.Count: > 0 }) throw new NotSupportedException($"training from an adapter with modules_to_save ({string.Join(", ", from.Saved.Keys)}) is not supported");
        if (from != null && from.Config.LoraBias != config.LoraBias) throw new ArgumentException($"the adapter to start from has lora_bias {from.Config.LoraBias}, the config {config.LoraBias}");
        var rng = new Random(seed);
        foreach (var module in LoraTargets(config))
        {
            if (lora.ContainsKey(module)) throw new InvalidOperationException($"{module} already has a LoRA layer");
            var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
            int r = config.For(module).Rank;
            float[] a, b;
            if (from != null && from.Modules.TryGetValue(module, out var w))
            {
                (a, b) = w;
            }
            else
            {
                a = DefaultLoraA(rng, r, inF);
                b = new float[outF * r];
            }

            Parameter? magnitude = null;
            if (config.UseDora)
            {
                float[] m;
                if (from != null && from.Magnitudes.TryGetValue(module, out var fm))
                {
                    m = fm;
                }
                else
                {
                    m = LoraMerge.RowNorms(model[module + ".weight"].Value.ToArray(), outF, inF).Select(v => (float)v).ToArray();
                }

                magnitude = new Parameter($"base_model.model.{module}.lora_magnitude_vector", model.Device.FromArray(module + ".lora_magnitude_vector", m, outF));
            }

            float[]? bias = !config.LoraBias ? null : from != null && from.Biases.TryGetValue(module, out var fb) ? fb : new float[outF];
            var layer = NewLoraLayer("", module, config, a, b, magnitude, bias);
            layer.A.Trainable = trainA;
            lora[module] = layer;
            linear(module).Adapter = layer;
        }

        if (freezeBase)
        {
            foreach (var p in model.Parameters) p.Trainable = false;
        }
    }

    /// <summary>The modules <paramref name="config"/> targets in this model; an error when none, or when its dropout is out of range.</summary>
    private List<string> LoraTargets(LoraAdapterConfig config)
    {
        var targets = config.TargetsIn(model.Config).ToList();
        if (targets.Count == 0) throw new ArgumentException($"LoRA target_modules [{string.Join(", ", config.TargetModules)}{config.TargetRegex}] match no module of this model");
        if (config.LoraDropout is < 0f or >= 1f) throw new ArgumentException($"lora_dropout {config.LoraDropout} must be in [0, 1)");
        return targets;
    }

    /// <summary>PEFT's default A (R, in): uniform in +-1/sqrt(in) (kaiming_uniform with a = sqrt(5)), drawn from <paramref name="rng"/>.</summary>
    private static float[] DefaultLoraA(Random rng, int rank, int inF)
    {
        float bound = 1f / MathF.Sqrt(inF);
        return Enumerable.Range(0, rank * inF).Select(_ => (float)((rng.NextDouble() * 2 - 1) * bound)).ToArray();
    }

    /// <summary>A LoRA layer on <paramref name="module"/>, its parameters named <paramref name="prefix"/> + PEFT's keys.</summary>
    private LoraLayer NewLoraLayer(string prefix, string module, LoraAdapterConfig config, float[] a, float[] b, Parameter? magnitude, float[]? bias)
    {
        int r = config.For(module).Rank;
        var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
        if (bias != null && magnitude != null) throw new NotSupportedException($"{module}: lora_bias with DoRA is not supported (nor in PEFT)");
        var pa = new Parameter($"{prefix}base_model.model.{module}.lora_A.weight", model.Device.FromArray($"{prefix}{module}.lora_A", a, r, inF));
        var pb = new Parameter($"{prefix}base_model.model.{module}.lora_B.weight", model.Device.FromArray($"{prefix}{module}.lora_B", b, outF, r));
        var pbias = bias == null ? null : new Parameter($"{prefix}base_model.model.{module}.lora_B.bias", model.Device.FromArray($"{prefix}{module}.lora_B.bias", bias, outF));
        return magnitude == null
            ? new LoraLayer(module, pa, pb, r, config.Scale(module), config.LoraDropout) { BiasB = pbias }
            : new DoraLayer(module, pa, pb, r, config.Scale(module), config.LoraDropout, magnitude);
    }

    /// <summary>lora_B's biases of <paramref name="layers"/> that have one, by module.</summary>
    private static Dictionary<string, float[]> Biases(IReadOnlyDictionary<string, LoraLayer> layers) =>
        layers.Where(l => l.Value.BiasB != null).ToDictionary(l => l.Key, l => l.Value.BiasB!.Value.ToArray());

    /// <summary>
    /// Chain of LoRA: merges every LoRA layer into its base weight (W += s B A, or DoRA's rescaled form), then starts
    /// it afresh in place (A from the default init with <paramref name="seed"/>, B = 0, m = ||W||_row), so the model
    /// computes the same function and the optimizer keeps the same parameter objects.
    /// </summary>
    public void MergeAndRestart(int seed)
    {
        var ops = model.Device.Ops;
        var rng = new Random(seed);
        if (lora.Values.Any(l => l.BiasB != null)) throw new NotSupportedException("chain of LoRA with lora_bias: merging lora_B's bias needs a bias on the base module, which Llama's have not");
        foreach (var (module, l) in lora)
        {
            var w = model[module + ".weight"].Value;
            int outF = w.Dim(0), inF = w.Dim(1);
            l.MergeInto(w);
            l.Magnitude?.Value.CopyFrom(LoraMerge.RowNorms(w.ToArray(), outF, inF).Select(v => (float)v).ToArray());
            l.A.Value.CopyFrom(DefaultLoraA(rng, l.Rank, inF));
            ops.Fill(l.B.Value, 0f);
        }

        loraInit.Clear();
        chainRestarts++;
    }

    /// <summary>How many times <see cref="MergeAndRestart"/> has folded the adapters into the base.</summary>
    public int ChainRestarts => chainRestarts;

    /// <summary>
    /// For initialisations with a non-zero product (LoRA-GA): W -= s B0 A0 keeps the model's function, and the
    /// initial factors are remembered so <see cref="Export"/> can express the adapter against the original base.
    /// </summary>
    public void AbsorbInit(string module, float[] a0, float[] b0)
    {
        var l = lora[module];
        var w = model[module + ".weight"].Value;
        using var ta = model.Device.FromArray("a0", a0, l.Rank, w.Dim(1));
        using var tb = model.Device.FromArray("b0", b0, w.Dim(0), l.Rank);
        model.Device.Ops.MatMul(tb, ta, w, alpha: -l.Scale, beta: 1f);
        loraInit[module] = (a0, b0);
    }

    /// <summary>The initial factors absorbed into the base by <see cref="AbsorbInit"/>, by module (checkpoints carry them).</summary>
    public IReadOnlyDictionary<string, (float[] A0, float[] B0)> InitFactors => loraInit;

    /// <summary>
    /// Remembers initial factors whose product the base weights already hold (a resumed LoRA-GA run: the checkpoint's
    /// weights are W - s B0 A0), without changing the weights again.
    /// </summary>
    public void RestoreInit(string module, float[] a0, float[] b0)
    {
        if (!lora.TryGetValue(module, out var l)) throw new ArgumentException($"initial LoRA factors for {module}, which has no LoRA layer");
        if (a0.Length != l.A.Value.Length || b0.Length != l.B.Value.Length)
        {
            throw new ArgumentException($"initial LoRA factors for {module}: A0 has {a0.Length} values and B0 {b0.Length}, the layer's A and B have {l.A.Value.Length} and {l.B.Value.Length}");
        }

        loraInit[module] = (a0, b0);
    }

    /// <summary>Removes every LoRA layer (after merging them, or to start a fresh one), freeing its tensors.</summary>
    public void Remove()
    {
        foreach (var l in lora.Values)
        {
            foreach (var p in l.Parameters) p.Dispose();
        }

        lora.Clear();
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(model.Config)) linear(module).Adapter = null;
        loraInit.Clear();
    }

    /// <summary>
    /// The LoRA layers as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>). After a LoRA-GA initialisation the base
    /// weights hold W - s B0 A0, so the adapter is exported against the original W: rank 2r with A' = [A; A0] and
    /// B' = [B, -B0], and alpha doubled (sqrt-2 times under rsLoRA) so the scale s stays the same.
    /// </summary>
    public PeftLoraAdapter Export(LoraAdapterConfig config)
    {
        if (chainRestarts > 0)
        {
            throw new InvalidOperationException($"the base weights have absorbed {chainRestarts} earlier LoRA links (chain of LoRA); the current adapter alone does not reproduce the " +
                $"model: save the model instead");
        }

        var magnitudes = lora.Where(l => l.Value.Magnitude != null).ToDictionary(l => l.Key, l => l.Value.Magnitude!.Value.ToArray());
        if (loraInit.Count == 0) return new(config, lora.ToDictionary(l => l.Key, l => (l.Value.A.Value.ToArray(), l.Value.B.Value.ToArray())), magnitudes, null, Biases(lora));
        if (config.RankPattern.Count > 0 || config.AlphaPattern.Count > 0) throw new NotSupportedException("exporting a LoRA-GA adapter with rank_pattern or alpha_pattern is not supported");
        int r2 = 2 * config.R;
        var doubled = config with { R = r2, LoraAlpha = config.UseRsLora ? config.LoraAlpha * MathF.Sqrt(2f) : config.LoraAlpha * 2 };
        var modules = new Dictionary<string, (float[], float[])>();
        foreach (var (module, l) in lora)
        {
            var (a0, b0) = loraInit[module];
            var a = l.A.Value.ToArray();
            var b = l.B.Value.ToArray();
            int r = l.Rank, outF = b.Length / r;
            var b2 = new float[outF * r2];
            for (int o = 0; o < outF; o++)
            {
                for (int j = 0; j < r; j++)
                {
                    b2[o * r2 + j] = b[o * r + j];
                    b2[o * r2 + r + j] = -b0[o * r + j];
                }
            }

            modules[module] = (a.Concat(a0).ToArray(), b2);
        }

        return new(doubled, modules, magnitudes, null, Biases(lora));
    }
}
