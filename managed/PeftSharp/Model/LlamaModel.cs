using PeftSharp.Data;
using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// A LoRA layer on one linear module: y = x W^T + Scale * (dropout(x) A^T) B^T. With DoRA, a trained magnitude m
/// (out) rescales each output: y = m / ||W + Scale B A||_row * (x W^T + Scale (x A^T) B^T), the norm treated as a
/// constant in the backward pass as PEFT does.
/// </summary>
public sealed class LoraLayer
{
    public LoraLayer(Parameter a, Parameter b, int rank, float scale, float dropout = 0f, Parameter? magnitude = null)
    {
        A = a;
        B = b;
        Rank = rank;
        Scale = scale;
        Dropout = dropout;
        Magnitude = magnitude;
    }

    public Parameter A { get; }
    public Parameter B { get; }
    public int Rank { get; }
    public float Scale { get; }

    /// <summary>Probability of zeroing an input of the LoRA branch while training (inputs kept are scaled by 1 / (1 - p)).</summary>
    public float Dropout { get; }

    /// <summary>DoRA's magnitude vector (out), or null for plain LoRA.</summary>
    public Parameter? Magnitude { get; }

    public IEnumerable<Parameter> Parameters => Magnitude == null ? new[] { A, B } : new[] { A, B, Magnitude };
}

/// <summary>
/// A Llama-family decoder (transformers' LlamaForCausalLM) over the engine's Ops: token embedding, pre-norm blocks of
/// RMSNorm, rotary grouped-query causal attention and a SwiGLU MLP with residuals, a final norm and the LM head (tied
/// to the embedding or not). Parameters carry Hugging Face's names. Forward and backward run on any device; the
/// backward is written out op by op, reusing the activations the forward saved.
/// Shapes: B batch, T tokens per sequence, N = B * T, Dm hidden, H/Hkv heads, D head dim, I intermediate, V vocab.
/// </summary>
public sealed class LlamaModel : IDisposable
{
    private readonly Dictionary<string, Parameter> byName = new();
    private readonly List<Parameter> parameters = new();
    private readonly Dictionary<string, LoraLayer> lora = new();
    private readonly Dictionary<string, (float[] A0, float[] B0)> loraInit = new();
    private int chainRestarts;
    private VirtualPrefix? prefix;
    private Lazy<ITokenizer>? tokenizer;
    private readonly List<LoraSet> loraSets = new();
    private int[]? setRows; // while a set-batched pass is built: rows of each adapter set, in set order

    private LlamaModel(Device device, LlamaConfig config)
    {
        Device = device;
        Config = config;
    }

    public Device Device { get; }

    public LlamaConfig Config { get; }

    /// <summary>
    /// The tokenizer text goes through (training rows, evaluation, generation): the model folder's tokenizer.json or
    /// tokenizer.model when it was loaded from one that has them (read on first use), else the built-in byte tokenizer
    /// when vocab_size is 259; otherwise an error. Setting it checks that its ids fit the embedding.
    /// </summary>
    public ITokenizer Tokenizer
    {
        get => tokenizer?.Value ?? (Config.VocabSize == ByteTokenizer.VocabSize
            ? ByteTokenizer.Instance
            : throw new InvalidOperationException($"the model has vocab_size {Config.VocabSize} and no tokenizer: load it from a folder with {HfTokenizer.JsonFile} or {HfTokenizer.SentencePieceFile}, or set Tokenizer (only vocab_size {ByteTokenizer.VocabSize} models use the built-in byte tokenizer)"));
        set
        {
            var checkedValue = CheckTokenizer(value);
            tokenizer = new Lazy<ITokenizer>(() => checkedValue);
        }
    }

    /// <summary>Whether <see cref="Tokenizer"/> has one to give (files from the folder, one set, or vocab_size 259).</summary>
    public bool HasTokenizer => tokenizer != null || Config.VocabSize == ByteTokenizer.VocabSize;

    /// <summary>Tokenizer files carried from the folder the model was loaded from, written again when it is saved.</summary>
    public IReadOnlyDictionary<string, byte[]> TokenizerFiles { get; private set; } = new Dictionary<string, byte[]>();

    /// <summary>Gives the model its folder's tokenizer files; they are parsed when <see cref="Tokenizer"/> is first read.</summary>
    public void UseTokenizerFiles(string folder, IReadOnlyDictionary<string, byte[]> files)
    {
        TokenizerFiles = files;
        tokenizer = files.Count == 0 || !HfTokenizer.Present(folder) ? null : new Lazy<ITokenizer>(() => CheckTokenizer(HfTokenizer.Load(folder)));
    }

    private ITokenizer CheckTokenizer(ITokenizer t)
    {
        if (t.VocabSize > Config.VocabSize)
        {
            throw new InvalidDataException($"tokenizer {t.Name} produces ids up to {t.VocabSize - 1}, but the model's vocab_size is {Config.VocabSize}");
        }

        return t;
    }

    /// <summary>The base model's parameters (what a Hugging Face folder holds).</summary>
    public IReadOnlyList<Parameter> Parameters => parameters;

    /// <summary>LoRA layers by module path (model.layers.0.self_attn.q_proj).</summary>
    public IReadOnlyDictionary<string, LoraLayer> Lora => lora;

    /// <summary>Everything an optimizer steps: the base parameters and the LoRA matrices.</summary>
    public IEnumerable<Parameter> AllParameters => parameters.Concat(lora.Values.SelectMany(l => l.Parameters))
        .Concat(loraSets.SelectMany(s => s.Layers.Values.SelectMany(l => l.Parameters))).Concat(prefix?.Parameters ?? Array.Empty<Parameter>());

    /// <summary>An adapter trained together with others in one batch (<see cref="AddLoraSet"/>): its name, config and layers by module.</summary>
    public sealed record LoraSet(string Name, PeftSharp.Formats.LoraAdapterConfig Config, IReadOnlyDictionary<string, LoraLayer> Layers);

    /// <summary>The adapters trained together, in the order a set-batched loss takes its sequences.</summary>
    public IReadOnlyList<LoraSet> LoraSets => loraSets;

    /// <summary>
    /// Adds one of several LoRA adapters trained in the same batch over the frozen base: each sequence of a batch
    /// belongs to one adapter (<see cref="Loss(int[], int[], int, bool, IReadOnlyList{int})"/>), the base product runs
    /// once for all rows, and each adapter's low-rank path runs on its own contiguous rows (segments, as Punica's SGMV
    /// lays a batch out). Same initialisation as <see cref="AddLora"/>; DoRA is not supported here.
    /// </summary>
    public void AddLoraSet(string name, PeftSharp.Formats.LoraAdapterConfig config, int seed)
    {
        if (lora.Count > 0) throw new InvalidOperationException("the model has a single LoRA adapter; adapter sets and AddLora do not mix");
        if (prefix != null) throw new InvalidOperationException("adapter sets together with prefix tuning are not supported");
        if (config.UseDora) throw new NotSupportedException($"adapter set '{name}': DoRA in adapter sets is not supported (train DoRA adapters one at a time)");
        if (string.IsNullOrWhiteSpace(name) || loraSets.Any(s => s.Name == name)) throw new ArgumentException($"adapter set name '{name}' is empty or already used");
        var rng = new Random(seed);
        var layers = new Dictionary<string, LoraLayer>();
        foreach (var module in LoraTargets(config))
        {
            var (outF, inF) = PeftSharp.Formats.PeftLoraAdapter.LinearShape(Config, module);
            int r = config.For(module).Rank;
            layers[module] = NewLoraLayer($"{name}/", module, config, DefaultLoraA(rng, r, inF), new float[outF * r], magnitude: null);
        }

        loraSets.Add(new LoraSet(name, config, layers));
        foreach (var p in parameters) p.Trainable = false;
    }

    /// <summary>One adapter of the set as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>).</summary>
    public PeftSharp.Formats.PeftLoraAdapter ExportLoraSet(string name)
    {
        var set = loraSets.FirstOrDefault(s => s.Name == name) ?? throw new ArgumentException($"no adapter set named '{name}' (have: {string.Join(", ", loraSets.Select(s => s.Name))})");
        return new(set.Config, set.Layers.ToDictionary(l => l.Key, l => (l.Value.A.Value.ToArray(), l.Value.B.Value.ToArray())), new Dictionary<string, float[]>());
    }

    /// <summary>
    /// Mean cross-entropy of a batch whose sequences belong to the adapter sets: the first
    /// <paramref name="sequencesPerSet"/>[0] sequences to set 0, the next to set 1, and so on. With
    /// <paramref name="backward"/>, each adapter's gradients come from its own rows only.
    /// </summary>
    public (double Loss, int Counted) Loss(int[] tokens, int[] targets, int batch, bool backward, IReadOnlyList<int> sequencesPerSet)
    {
        if (sequencesPerSet.Count != loraSets.Count) throw new ArgumentException($"{sequencesPerSet.Count} sequence counts for {loraSets.Count} adapter sets");
        if (sequencesPerSet.Any(c => c < 0) || sequencesPerSet.Sum() != batch) throw new ArgumentException($"sequence counts [{string.Join(", ", sequencesPerSet)}] do not add up to the batch of {batch}");
        if (batch <= 0 || tokens.Length % batch != 0) throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        setRows = sequencesPerSet.Select(c => c * (tokens.Length / batch)).ToArray();
        try
        {
            return Loss(tokens, targets, batch, backward);
        }
        finally
        {
            setRows = null;
        }
    }

    /// <summary>Prefix tuning's virtual tokens, when added (<see cref="AddPrefixTuning"/>).</summary>
    public VirtualPrefix? Prefix => prefix;

    /// <summary>
    /// Adds prefix tuning (P-tuning v2 without the reparameterising MLP): <paramref name="tokens"/> trainable virtual
    /// tokens per layer, keys and values (P, Hkv, D) drawn from normal(0, 1) as PEFT's prefix embedding initialises
    /// them, or taken from <paramref name="keys"/> and <paramref name="values"/> (one array per layer). The base
    /// freezes.
    /// </summary>
    public void AddPrefixTuning(int tokens, int seed, IReadOnlyList<float[]>? keys = null, IReadOnlyList<float[]>? values = null, int projectionHidden = 0)
    {
        if (prefix != null) throw new InvalidOperationException("the model already has prefix tuning");
        if (tokens <= 0) throw new ArgumentException($"num_virtual_tokens {tokens} must be positive");
        if (projectionHidden < 0 || (projectionHidden > 0 && keys != null)) throw new ArgumentException("a prefix projection starts from its own initialisation, not from given keys and values");
        var c = Config;
        int tokenDim = c.NumKeyValueHeads * c.HeadDim, size = tokens * tokenDim;
        var rng = new Random(seed);
        float[] Init(IReadOnlyList<float[]>? given, int layer, string what)
        {
            if (given == null) return projectionHidden > 0 ? new float[size] : Enumerable.Range(0, size).Select(_ => (float)Gaussian(rng)).ToArray();
            if (given.Count != c.NumHiddenLayers || given[layer].Length != size)
            {
                throw new ArgumentException($"prefix {what}: expected {c.NumHiddenLayers} layers of {tokens} x {c.NumKeyValueHeads} x {c.HeadDim} values");
            }

            return given[layer];
        }

        var k = new List<Parameter>();
        var v = new List<Parameter>();
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            k.Add(new Parameter($"prefix.{l}.key", Device.FromArray($"prefix.{l}.key", Init(keys, l, "keys"), tokens, c.NumKeyValueHeads, c.HeadDim)));
            v.Add(new Parameter($"prefix.{l}.value", Device.FromArray($"prefix.{l}.value", Init(values, l, "values"), tokens, c.NumKeyValueHeads, c.HeadDim)));
        }

        PrefixProjection? projection = null;
        if (projectionHidden > 0)
        {
            // PyTorch's defaults: the embedding from normal(0, 1), each Linear's weight and bias uniform in +-1/sqrt(fan_in).
            Parameter Uniform(string name, int fanIn, params int[] shape)
            {
                float bound = 1f / MathF.Sqrt(fanIn);
                int n = shape.Aggregate(1, (a, b) => a * b);
                return new Parameter(name, Device.FromArray(name, Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() * 2 - 1) * bound)).ToArray(), shape));
            }

            int outDim = c.NumHiddenLayers * 2 * tokenDim;
            projection = new PrefixProjection(
                new Parameter("prefix.embedding", Device.FromArray("prefix.embedding", Enumerable.Range(0, size).Select(_ => (float)Gaussian(rng)).ToArray(), tokens, tokenDim)),
                Uniform("prefix.transform.0.weight", tokenDim, projectionHidden, tokenDim), Uniform("prefix.transform.0.bias", tokenDim, projectionHidden),
                Uniform("prefix.transform.2.weight", projectionHidden, outDim, projectionHidden), Uniform("prefix.transform.2.bias", projectionHidden, outDim));
        }

        prefix = new VirtualPrefix(k, v, projection);
        prefix.Materialize();
        foreach (var p in parameters) p.Trainable = false;
    }

    /// <summary>
    /// Mean cross-entropy of G completions of one prompt, the prompt encoded once (Prefix Grouper): each completion
    /// is predicted from the prompt and its own earlier tokens, exactly as in a batch with the prompt copied before
    /// each completion (loss on completion tokens only). Completions are padded with <paramref name="pad"/> to one
    /// length; padding is not counted. With <paramref name="backward"/>, gradients (times
    /// <paramref name="gradientWeight"/>, for averaging over several groups) are added to trainable parameters.
    /// </summary>
    public (double Loss, int Counted) GroupedLoss(int[] prompt, IReadOnlyList<int[]> completions, bool backward, int pad = 0, float gradientWeight = 1f)
    {
        if (prompt.Length == 0) throw new ArgumentException("a grouped batch needs a prompt of at least one token");
        if (completions.Count == 0 || completions.Any(cpl => cpl.Length == 0)) throw new ArgumentException("a grouped batch needs one or more non-empty completions");
        int g = completions.Count, len = completions.Max(cpl => cpl.Length), shared = prompt.Length - 1, each = len;
        // Completion rows: [last prompt token, c0 .. c(len-2)] predicting [c0 .. c(len-1)].
        var tokens = new int[shared + g * each];
        var targets = new int[tokens.Length];
        Array.Copy(prompt, tokens, shared);
        Array.Fill(targets, -100, 0, shared);
        for (int j = 0; j < g; j++)
        {
            int at = shared + j * each;
            for (int r = 0; r < each; r++)
            {
                tokens[at + r] = r == 0 ? prompt[^1] : r - 1 < completions[j].Length ? completions[j][r - 1] : pad;
                targets[at + r] = r < completions[j].Length ? completions[j][r] : -100;
            }
        }

        return CrossEntropyLoss(tokens, targets, new GroupedLayout(shared, g, each, prefix), backward, gradientWeight);
    }

    /// <summary>
    /// Seeds the LoRA dropout masks of the next training forward pass (a trainer sets it from its seed and step, so
    /// a resumed run draws the same masks as an uninterrupted one).
    /// </summary>
    public int DropoutSeed { get; set; }

    public Parameter this[string name] => byName.TryGetValue(name, out var p)
        ? p
        : throw new KeyNotFoundException($"model has no parameter '{name}'");

    public bool Has(string name) => byName.ContainsKey(name);

    public long ParameterCount => parameters.Sum(p => (long)p.Value.Length);

    /// <summary>The Hugging Face names and shapes of every parameter this config has, in checkpoint order.</summary>
    public static IEnumerable<(string Name, int[] Shape)> ParameterShapes(LlamaConfig c)
    {
        int d = c.HeadDim;
        yield return ("model.embed_tokens.weight", new[] { c.VocabSize, c.HiddenSize });
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.";
            yield return (p + "input_layernorm.weight", new[] { c.HiddenSize });
            yield return (p + "self_attn.q_proj.weight", new[] { c.NumAttentionHeads * d, c.HiddenSize });
            yield return (p + "self_attn.k_proj.weight", new[] { c.NumKeyValueHeads * d, c.HiddenSize });
            yield return (p + "self_attn.v_proj.weight", new[] { c.NumKeyValueHeads * d, c.HiddenSize });
            yield return (p + "self_attn.o_proj.weight", new[] { c.HiddenSize, c.NumAttentionHeads * d });
            yield return (p + "post_attention_layernorm.weight", new[] { c.HiddenSize });
            yield return (p + "mlp.gate_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return (p + "mlp.up_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return (p + "mlp.down_proj.weight", new[] { c.HiddenSize, c.IntermediateSize });
        }

        yield return ("model.norm.weight", new[] { c.HiddenSize });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new[] { c.VocabSize, c.HiddenSize });
    }

    /// <summary>
    /// A freshly initialised model: norms at 1, every other weight normal(0, 0.02) as transformers initialises Llama,
    /// from a seeded generator (the same seed gives the same weights on every device).
    /// </summary>
    public static LlamaModel Create(Device device, LlamaConfig config, int seed)
    {
        config.Validate();
        var rng = new Random(seed);
        return FromTensors(device, config, (name, shape) =>
        {
            int n = shape.Aggregate(1, (a, b) => a * b);
            var v = new float[n];
            if (name.EndsWith("norm.weight", StringComparison.Ordinal))
            {
                Array.Fill(v, 1f);
            }
            else
            {
                for (int i = 0; i < n; i++) v[i] = (float)(0.02 * Gaussian(rng));
            }

            return v;
        });
    }

    /// <summary>Builds a model whose parameter values come from <paramref name="values"/> (name, shape) -> data.</summary>
    public static LlamaModel FromTensors(Device device, LlamaConfig config, Func<string, int[], float[]> values)
    {
        config.Validate();
        var model = new LlamaModel(device, config);
        try
        {
            foreach (var (name, shape) in ParameterShapes(config))
            {
                var data = values(name, shape);
                var p = new Parameter(name, device.FromArray(name, data, shape));
                model.parameters.Add(p);
                model.byName.Add(name, p);
            }
        }
        catch
        {
            model.Dispose();
            throw;
        }

        return model;
    }

    private static double Gaussian(Random rng)
    {
        double u1 = 1.0 - rng.NextDouble();
        double u2 = rng.NextDouble();
        return Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
    }

    private Parameter LmHeadParameter => Config.TieWordEmbeddings ? this["model.embed_tokens.weight"] : this["lm_head.weight"];

    private Tensor LmHead => LmHeadParameter.Value;

    /// <summary>Logits (B * T, V) for <paramref name="tokens"/> (B, T), as a host array.</summary>
    public float[] Logits(int[] tokens, int batch)
    {
        using var pass = Forward(tokens, batch, keepActivations: false);
        return pass.Logits.ToArray();
    }

    /// <summary>
    /// Mean cross-entropy of predicting <paramref name="targets"/> (B * T; -100 ignores a position) from
    /// <paramref name="tokens"/> (B, T). With <paramref name="backward"/>, gradients are added to each trainable
    /// parameter's Grad (call ZeroGrad first for a fresh step). Returns the loss and the number of counted targets.
    /// </summary>
    public (double Loss, int Counted) Loss(int[] tokens, int[] targets, int batch, bool backward)
    {
        if (targets.Length != tokens.Length)
        {
            throw new ArgumentException($"targets has {targets.Length} entries for {tokens.Length} tokens");
        }

        if (batch <= 0 || tokens.Length % batch != 0)
        {
            throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        }

        return CrossEntropyLoss(tokens, targets, new BatchLayout(batch, tokens.Length / batch, prefix), backward);
    }

    /// <summary>Mean cross-entropy over the counted targets of a pass in <paramref name="layout"/>, with its backward.</summary>
    private (double Loss, int Counted) CrossEntropyLoss(int[] tokens, int[] targets, AttentionLayout layout, bool backward, float gradientWeight = 1f)
    {
        var ops = Device.Ops;
        using var pass = Forward(tokens, layout, keepActivations: backward);
        using var tgt = Device.FromIndices("targets", targets);
        using var losses = Device.Zeros("losses", tokens.Length);
        int counted = ops.CrossEntropy(pass.Logits, tgt, losses);
        double loss = counted == 0 ? 0 : ops.Sum(losses) / counted;
        if (backward && counted > 0)
        {
            using var dLogits = Device.Zeros("dlogits", tokens.Length, Config.VocabSize);
            ops.CrossEntropyBackward(pass.Logits, tgt, dLogits, gradientWeight / counted);
            Backward(pass, dLogits);
        }

        return (loss, counted);
    }

    /// <summary>
    /// Mean squared error between this model's logits for <paramref name="tokens"/> (B, T) and
    /// <paramref name="teacher"/> (B * T, V), averaged over every logit (distillation, as BitDelta's scale
    /// distillation uses). With <paramref name="backward"/>, gradients are added to each trainable parameter's Grad.
    /// </summary>
    public double LogitMse(int[] tokens, int batch, float[] teacher, bool backward)
    {
        int count = tokens.Length * Config.VocabSize;
        if (teacher.Length != count) throw new ArgumentException($"teacher logits have {teacher.Length} values, expected {tokens.Length} x {Config.VocabSize}");
        var ops = Device.Ops;
        using var pass = Forward(tokens, batch, keepActivations: backward);
        using var diff = Device.FromArray("teacher_logits", teacher, tokens.Length, Config.VocabSize);
        ops.Scale(diff, -1f, diff);
        ops.Add(pass.Logits, diff, diff); // logits - teacher
        double mse = ops.SumSquares(diff) / count;
        if (backward)
        {
            ops.Scale(diff, 2f / count, diff);
            Backward(pass, diff);
        }

        return mse;
    }

    private sealed class LayerActivations : IDisposable
    {
        public Tensor X = null!, H = null!, Rstd1 = null!, Q = null!, K = null!, V = null!, O = null!, Lse = null!;
        public Tensor X1 = null!, H2 = null!, Rstd2 = null!, Gate = null!, Up = null!, Act = null!;

        public void Dispose()
        {
            foreach (var t in new[] { X, H, Rstd1, Q, K, V, O, Lse, X1, H2, Rstd2, Gate, Up, Act }) t?.Dispose();
        }
    }

    /// <summary>What a LoRA module's forward keeps for its backward.</summary>
    private sealed class LoraSaved : IDisposable
    {
        public Tensor T = null!;           // (rows, R): x A^T (of the dropped-out x)
        public Tensor? Mask, XDropped;     // (rows, in) when dropout is on
        public Tensor? Z, C, InvNorm;      // DoRA: the unscaled output (rows, out), m / norm and 1 / norm (out)

        public void Dispose()
        {
            foreach (var t in new[] { T, Mask, XDropped, Z, C, InvNorm }) t?.Dispose();
        }
    }

    private sealed class Pass : IDisposable
    {
        public int Tokens;
        public AttentionLayout Layout = null!;
        public IndexTensor Ids = null!, Positions = null!;
        public List<LayerActivations> Layers = new();
        public Tensor XFinal = null!, HFinal = null!, RstdFinal = null!, Logits = null!;
        public Dictionary<string, LoraSaved> Lora = new();
        public int[]? SetRows;

        public void Dispose()
        {
            foreach (var t in Lora.Values) t.Dispose();
            foreach (var l in Layers) l.Dispose();
            foreach (var t in new IDisposable?[] { Ids, Positions, XFinal, HFinal, RstdFinal, Logits }) t?.Dispose();
        }
    }

    private Pass Forward(int[] tokens, int batch, bool keepActivations)
    {
        if (batch <= 0 || tokens.Length % batch != 0)
        {
            throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        }

        return Forward(tokens, new BatchLayout(batch, tokens.Length / batch, prefix), keepActivations);
    }

    private Pass Forward(int[] tokens, AttentionLayout layout, bool keepActivations)
    {
        var c = Config;
        int n = tokens.Length, dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads;
        if (layout.Rows != n) throw new ArgumentException($"{n} tokens for an attention layout of {layout.Rows} rows");
        int maxPosition = n == 0 ? 0 : layout.Positions.Max() + 1;
        if (maxPosition > c.MaxPositionEmbeddings)
        {
            throw new ArgumentException($"sequence length {maxPosition} exceeds max_position_embeddings = {c.MaxPositionEmbeddings}");
        }

        var ops = Device.Ops;
        prefix?.Materialize(); // a reparameterised prefix is recomputed from its (possibly just stepped) MLP
        var pass = new Pass { Tokens = n, Layout = layout, SetRows = setRows };
        try
        {
            pass.Ids = Device.FromIndices("input_ids", tokens);
            pass.Positions = Device.FromIndices("positions", layout.Positions);
            var x = Device.Zeros("x0", n, dm);
            var keep = keepActivations ? pass.Lora : null;
            ops.Embedding(pass.Ids, this["model.embed_tokens.weight"].Value, x);
            pass.XFinal = x; // the residual stream so far: disposed with the pass even if a layer throws (disposal is idempotent)
            for (int i = 0; i < c.NumHiddenLayers; i++)
            {
                string p = $"model.layers.{i}.";
                // Inference through plain o_proj and down_proj adds both products into the residual stream in place
                // (beta = 1): no layer keeps its input, so neither the two residual adds nor their outputs are needed.
                bool inPlace = !keepActivations && IsPlain(p + "self_attn.o_proj") && IsPlain(p + "mlp.down_proj");
                var a = new LayerActivations { X = inPlace ? null! : x };
                pass.Layers.Add(a);
                a.H = Device.Empty("h", n, dm);
                a.Rstd1 = Device.Zeros("rstd1", n);
                ops.RmsNorm(x, this[p + "input_layernorm.weight"].Value, a.H, a.Rstd1, c.RmsNormEps);
                a.Q = Device.Empty("q", 1, n, h, d);
                a.K = Device.Empty("k", 1, n, hkv, d);
                a.V = Device.Empty("v", 1, n, hkv, d);
                Project(p + "self_attn.q_proj", a.H, Flat(a.Q, n), keep);
                Project(p + "self_attn.k_proj", a.H, Flat(a.K, n), keep);
                Project(p + "self_attn.v_proj", a.H, Flat(a.V, n), keep);
                ops.Rope(a.Q, pass.Positions, a.Q, c.RopeTheta, scaling: c.RopeScaling);
                ops.Rope(a.K, pass.Positions, a.K, c.RopeTheta, scaling: c.RopeScaling);
                a.O = Device.Zeros("attn", 1, n, h, d);
                a.Lse = Device.Zeros("lse", 1, n, h);
                layout.Forward(ops, i, a.Q, a.K, a.V, a.O, a.Lse);
                Tensor x1;
                if (inPlace)
                {
                    ops.MatMul(Flat(a.O, n), this[p + "self_attn.o_proj.weight"].Value, x, transposeB: true, beta: 1f);
                    x1 = x;
                }
                else
                {
                    x1 = a.X1 = Device.Empty("x1", n, dm);
                    Project(p + "self_attn.o_proj", Flat(a.O, n), a.X1, keep);
                    ops.Add(a.X1, x, a.X1);
                }

                a.H2 = Device.Empty("h2", n, dm);
                a.Rstd2 = Device.Zeros("rstd2", n);
                ops.RmsNorm(x1, this[p + "post_attention_layernorm.weight"].Value, a.H2, a.Rstd2, c.RmsNormEps);
                a.Act = Device.Empty("act", n, c.IntermediateSize);
                if (!keepActivations && IsPlain(p + "mlp.gate_proj") && IsPlain(p + "mlp.up_proj"))
                {
                    // Inference through base weights only: gate and up are never needed apart, so they are not stored.
                    ops.LinearSwiGlu(a.H2, this[p + "mlp.gate_proj.weight"].Value, this[p + "mlp.up_proj.weight"].Value, a.Act);
                }
                else
                {
                    a.Gate = Device.Empty("gate", n, c.IntermediateSize);
                    a.Up = Device.Empty("up", n, c.IntermediateSize);
                    Project(p + "mlp.gate_proj", a.H2, a.Gate, keep);
                    Project(p + "mlp.up_proj", a.H2, a.Up, keep);
                    ops.SwiGlu(a.Gate, a.Up, a.Act);
                }
                if (inPlace)
                {
                    ops.MatMul(a.Act, this[p + "mlp.down_proj.weight"].Value, x, transposeB: true, beta: 1f);
                }
                else
                {
                    var x2 = Device.Empty("x2", n, dm);
                    Project(p + "mlp.down_proj", a.Act, x2, keep);
                    ops.Add(x2, a.X1, x2);
                    x = pass.XFinal = x2;
                }

                if (!keepActivations)
                {
                    pass.Layers.Remove(a);
                    a.Dispose();
                }
            }

            pass.XFinal = x;
            pass.HFinal = Device.Empty("h_final", n, dm);
            pass.RstdFinal = Device.Zeros("rstd_final", n);
            ops.RmsNorm(x, this["model.norm.weight"].Value, pass.HFinal, pass.RstdFinal, c.RmsNormEps);
            pass.Logits = Device.Empty("logits", n, c.VocabSize);
            ops.Linear(pass.HFinal, LmHead, pass.Logits);
            return pass;
        }
        catch
        {
            pass.Dispose();
            throw;
        }
    }

    /// <summary>A (rows, last two dims merged) view: (B, T, H, D) as (N, H * D).</summary>
    private static Tensor Flat(Tensor t, int rows) => t.Reshape(rows, t.Length / rows);

    /// <summary>Backpropagates dL/dlogits (N, V) through the pass, adding into every trainable parameter's Grad.</summary>
    private void Backward(Pass pass, Tensor dLogits)
    {
        var c = Config;
        var ops = Device.Ops;
        int n = pass.Tokens, dm = c.HiddenSize;
        var head = LmHeadParameter;
        using var dh = Device.Zeros("dh_final", n, dm);
        ops.LinearBackward(pass.HFinal, LmHead, dLogits, dh, head.Trainable ? head.Grad : null, accumulateWeight: true);
        var dx = Device.Zeros("dx", n, dm);
        try
        {
            AddNormBackward(dh, pass.XFinal, "model.norm.weight", pass.RstdFinal, dx, accumulateInput: false);
            using var dTmp = Device.Zeros("dtmp", n, dm);
            using var dInter = Device.Zeros("dinter", n, c.IntermediateSize);
            using var dGate = Device.Zeros("dgate", n, c.IntermediateSize);
            using var dUp = Device.Zeros("dup", n, c.IntermediateSize);
            using var dh2 = Device.Zeros("dh2", n, dm);
            using var dhAttn = Device.Zeros("dh", n, dm);
            for (int i = c.NumHiddenLayers - 1; i >= 0; i--)
            {
                string p = $"model.layers.{i}.";
                var a = pass.Layers[i];
                // MLP: x2 = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1). dx holds dL/dx2.
                ProjectBackward(p + "mlp.down_proj", a.Act, dx, dInter, pass);
                ops.SwiGluBackward(a.Gate, a.Up, dInter, dGate, dUp);
                ProjectBackward(p + "mlp.gate_proj", a.H2, dGate, dh2, pass);
                ProjectBackward(p + "mlp.up_proj", a.H2, dUp, dTmp, pass);
                ops.Add(dh2, dTmp, dh2);
                AddNormBackward(dh2, a.X1, p + "post_attention_layernorm.weight", a.Rstd2, dx, accumulateInput: true); // dx = dL/dx1

                // Attention: x1 = x + o_proj(attn(rope(q(h)), rope(k(h)), v(h))), h = norm(x).
                using var dO = Device.Zeros("dattn", a.O.Shape.ToArray());
                ProjectBackward(p + "self_attn.o_proj", Flat(a.O, n), dx, Flat(dO, n), pass);
                using var dq = Device.Zeros("dq", a.Q.Shape.ToArray());
                using var dk = Device.Zeros("dk", a.K.Shape.ToArray());
                using var dv = Device.Zeros("dv", a.V.Shape.ToArray());
                pass.Layout.Backward(ops, i, a.Q, a.K, a.V, a.O, a.Lse, dO, dq, dk, dv);
                ops.Rope(dq, pass.Positions, dq, c.RopeTheta, inverse: true, scaling: c.RopeScaling);
                ops.Rope(dk, pass.Positions, dk, c.RopeTheta, inverse: true, scaling: c.RopeScaling);
                ProjectBackward(p + "self_attn.q_proj", a.H, Flat(dq, n), dhAttn, pass);
                ProjectBackward(p + "self_attn.k_proj", a.H, Flat(dk, n), dTmp, pass);
                ops.Add(dhAttn, dTmp, dhAttn);
                ProjectBackward(p + "self_attn.v_proj", a.H, Flat(dv, n), dTmp, pass);
                ops.Add(dhAttn, dTmp, dhAttn);
                AddNormBackward(dhAttn, a.X, p + "input_layernorm.weight", a.Rstd1, dx, accumulateInput: true); // dx = dL/dx
            }

            if (prefix?.Projection != null) prefix.Projection.Backward(prefix);
            var embed = this["model.embed_tokens.weight"];
            if (embed.Trainable)
            {
                using var dEmbed = Device.Zeros("dembed", c.VocabSize, dm);
                ops.EmbeddingBackward(pass.Ids, dx, dEmbed);
                ops.Axpy(1f, dEmbed, embed.Grad);
            }
        }
        finally
        {
            dx.Dispose();
        }
    }

    private Tensor? GradOf(string name)
    {
        var p = this[name];
        return p.Trainable ? p.Grad : null;
    }

    /// <summary>RMSNorm backward: dx (+)= d/dx, and the weight's gradient accumulated into its Grad.</summary>
    private void AddNormBackward(Tensor dy, Tensor x, string weight, Tensor rstd, Tensor dx, bool accumulateInput)
    {
        var ops = Device.Ops;
        var w = this[weight];
        using var dxPart = Device.Zeros("dx_norm", x.Shape.ToArray());
        using var dw = Device.Zeros("dw_norm", w.Value.Shape.ToArray());
        ops.RmsNormBackward(dy, x, w.Value, rstd, dxPart, dw);
        if (w.Trainable) ops.Axpy(1f, dw, w.Grad);
        if (accumulateInput) ops.Add(dx, dxPart, dx);
        else ops.Copy(dxPart, dx);
    }

    /// <summary>
    /// Runs <paramref name="newTokens"/> (one sequence) through the model at positions cache.Length onward, appending
    /// their keys and values to <paramref name="cache"/>; returns the logits (V) of the last new token. Attention reads
    /// the cached keys and values instead of recomputing them (bottom-right causal alignment over the cache).
    /// </summary>
    public float[] DecodeStep(KvCache cache, int[] newTokens, IRowVariants? variants = null) =>
        DecodeBatch(new[] { cache }, new[] { newTokens }, variants)[0];

    /// <summary>
    /// One step for many sequences at once: sequence j appends <paramref name="newTokens"/>[j] to
    /// <paramref name="caches"/>[j]. The rows of every sequence are stacked into one (N, Dm) batch so each linear
    /// layer runs once for all of them (with <paramref name="variants"/> adding each row's own LoRA, 1-bit or sparse
    /// delta over the shared base weight); attention runs per sequence over its own cache. Returns the logits (V) of
    /// each sequence's last new token.
    /// </summary>
    public float[][] DecodeBatch(IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IRowVariants? variants = null, IReadOnlyList<KvCache?>? prefixes = null)
    {
        var c = Config;
        if (caches.Count != newTokens.Count || caches.Count == 0)
        {
            throw new ArgumentException($"DecodeBatch needs one token list per cache ({caches.Count} caches, {newTokens.Count} token lists)");
        }

        if (prefixes != null && prefixes.Count != caches.Count) throw new ArgumentException($"DecodeBatch: {prefixes.Count} prefix entries for {caches.Count} sequences");
        // Each sequence reads the chain of shared prefixes above its own cache: its cache's parents, or (older form)
        // the prefix given for it and that prefix's parents.
        var chains = Enumerable.Range(0, caches.Count).Select(j =>
        {
            var given = prefixes?[j];
            if (given != null && caches[j].Parent != null && !ReferenceEquals(given, caches[j].Parent)) throw new ArgumentException($"DecodeBatch: sequence {j}'s cache already continues another prefix");
            var top = caches[j].Parent ?? given;
            return top == null ? new List<KvCache>() : top.Chain.Append(top).ToList();
        }).ToArray();
        if (chains.Any(ch => ch.Any(caches.Contains))) throw new ArgumentException("DecodeBatch: a shared prefix cannot also be a sequence's own cache");
        int virtualTokens = prefix?.Tokens ?? 0;
        prefix?.Materialize();
        int PrefixLength(int j) => virtualTokens + chains[j].Sum(pf => pf.Length);

        if (caches.Distinct().Count() != caches.Count) throw new ArgumentException("DecodeBatch: a KV cache appears twice in one step");
        int seqs = caches.Count, dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads;
        var rowStart = new int[seqs + 1];
        for (int j = 0; j < seqs; j++)
        {
            int tn = newTokens[j].Length;
            if (tn == 0) throw new ArgumentException($"DecodeBatch: sequence {j} has no new token");
            if (caches[j].Length + tn > caches[j].Capacity)
            {
                throw new ArgumentException($"KV cache {j} holds {caches[j].Capacity} positions; {caches[j].Length} used + {tn} new do not fit");
            }

            if (PrefixLength(j) + caches[j].Length + tn > c.MaxPositionEmbeddings)
            {
                throw new ArgumentException($"sequence {j}: shared prefix {PrefixLength(j)} + {caches[j].Length} cached + {tn} new positions exceed max_position_embeddings = {c.MaxPositionEmbeddings}");
            }

            rowStart[j + 1] = rowStart[j] + tn;
        }

        int n = rowStart[seqs];
        if (variants != null && variants.Rows != n) throw new ArgumentException($"DecodeBatch: the variant batch covers {variants.Rows} rows, the step has {n}");
        var ops = Device.Ops;
        var flatIds = newTokens.SelectMany(t => t).ToArray();
        using var ids = Device.FromIndices("input_ids", flatIds);
        using var pos = Device.FromIndices("positions", Enumerable.Range(0, seqs).SelectMany(j => Enumerable.Range(PrefixLength(j) + caches[j].Length, newTokens[j].Length)).ToArray());
        // Runs of consecutive sequences reading the same shared prefix (at any depth of their chains): their query rows
        // attend to it as one matrix.
        var prefixRuns = new List<(KvCache Prefix, int Row0, int Rows)>();
        foreach (var pf in chains.SelectMany(ch => ch).Distinct())
        {
            for (int j = 0; j < seqs;)
            {
                if (!chains[j].Contains(pf))
                {
                    j++;
                    continue;
                }

                int e = j;
                while (e < seqs && chains[e].Contains(pf)) e++;
                if (pf.Length > 0) prefixRuns.Add((pf, rowStart[j], rowStart[e] - rowStart[j]));
                j = e;
            }
        }

        using var x = Device.Zeros("x", n, dm);
        using var hbuf = Device.Zeros("h", n, dm);
        using var rstd = Device.Zeros("rstd", n);
        using var q = Device.Zeros("q", 1, n, h, d);
        using var k = Device.Zeros("k", 1, n, hkv, d);
        using var v = Device.Zeros("v", 1, n, hkv, d);
        using var o = Device.Zeros("attn", 1, n, h, d);
        using var lse = Device.Zeros("lse", 1, n, h);
        using var tmp = Device.Zeros("tmp", n, dm);
        using var gate = Device.Zeros("gate", n, c.IntermediateSize);
        using var up = Device.Zeros("up", n, c.IntermediateSize);
        ops.Embedding(ids, this["model.embed_tokens.weight"].Value, x);
        foreach (var (r0, rows, table) in ReplacementRuns(variants, "model.embed_tokens.weight", Enumerable.Range(0, n)))
        {
            using var runIds = Device.FromIndices("input_ids_variant", flatIds.AsSpan(r0, rows));
            ops.Embedding(runIds, table, x.View(r0 * dm, rows, dm));
        }

        // RMSNorm with each row's variant's weight where it has its own (x, hbuf (N, Dm), rstd (N)).
        void Norm(string name)
        {
            ops.RmsNorm(x, this[name].Value, hbuf, rstd, c.RmsNormEps);
            foreach (var (r0, rows, w) in ReplacementRuns(variants, name, Enumerable.Range(0, n)))
            {
                ops.RmsNorm(x.View(r0 * dm, rows, dm), w, hbuf.View(r0 * dm, rows, dm), rstd.View(r0, rows), c.RmsNormEps);
            }
        }

        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.";
            Norm(p + "input_layernorm.weight");
            Project(p + "self_attn.q_proj", hbuf, Flat(q, n), null, variants);
            Project(p + "self_attn.k_proj", hbuf, Flat(k, n), null, variants);
            Project(p + "self_attn.v_proj", hbuf, Flat(v, n), null, variants);
            ops.Rope(q, pos, q, c.RopeTheta, scaling: c.RopeScaling);
            ops.Rope(k, pos, k, c.RopeTheta, scaling: c.RopeScaling);
            for (int j = 0; j < seqs; j++)
            {
                var cache = caches[j];
                int r0 = rowStart[j], tn = rowStart[j + 1] - r0, start = cache.Length, total = start + tn;
                ops.Copy(k.View(r0 * hkv * d, 1, tn, hkv, d), cache.Keys[i].View(start * hkv * d, 1, tn, hkv, d));
                ops.Copy(v.View(r0 * hkv * d, 1, tn, hkv, d), cache.Values[i].View(start * hkv * d, 1, tn, hkv, d));
                ops.Attention(q.View(r0 * h * d, 1, tn, h, d), cache.Keys[i].View(0, 1, total, hkv, d), cache.Values[i].View(0, 1, total, hkv, d),
                    o.View(r0 * h * d, 1, tn, h, d), lse.View(r0 * h, 1, tn, h), causal: true);
            }

            // Prefix tuning: every row reads the layer's virtual tokens, one pass for the whole batch.
            if (prefix != null)
            {
                using var vo = Device.Zeros("virtual_attn", 1, n, h, d);
                using var vl = Device.Zeros("virtual_lse", 1, n, h);
                var level = prefix.Level(i, 1);
                ops.Attention(q, level.Keys, level.Values, vo, vl, causal: false);
                ops.AttentionMerge(o, lse, vo, vl, o, lse);
            }

            // Hydragen: every run's queries against its shared prefix in one pass, merged exactly by log-sum-exp.
            foreach (var (pf, r0, rows) in prefixRuns)
            {
                using var po = Device.Zeros("prefix_attn", 1, rows, h, d);
                using var pl = Device.Zeros("prefix_lse", 1, rows, h);
                ops.Attention(q.View(r0 * h * d, 1, rows, h, d), pf.Keys[i].View(0, 1, pf.Length, hkv, d), pf.Values[i].View(0, 1, pf.Length, hkv, d), po, pl, causal: false);
                var rowsO = o.View(r0 * h * d, 1, rows, h, d);
                var rowsL = lse.View(r0 * h, 1, rows, h);
                ops.AttentionMerge(rowsO, rowsL, po, pl, rowsO, rowsL);
            }

            Project(p + "self_attn.o_proj", Flat(o, n), tmp, null, variants);
            ops.Add(x, tmp, x);
            Norm(p + "post_attention_layernorm.weight");
            if (variants == null && IsPlain(p + "mlp.gate_proj") && IsPlain(p + "mlp.up_proj"))
            {
                ops.LinearSwiGlu(hbuf, this[p + "mlp.gate_proj.weight"].Value, this[p + "mlp.up_proj.weight"].Value, gate);
            }
            else
            {
                Project(p + "mlp.gate_proj", hbuf, gate, null, variants);
                Project(p + "mlp.up_proj", hbuf, up, null, variants);
                ops.SwiGlu(gate, up, gate);
            }
            Project(p + "mlp.down_proj", gate, tmp, null, variants);
            ops.Add(x, tmp, x);
        }

        for (int j = 0; j < seqs; j++) caches[j].Length += newTokens[j].Length;
        using var last = Device.Zeros("x_last", seqs, dm);
        for (int j = 0; j < seqs; j++) ops.Copy(x.View((rowStart[j + 1] - 1) * dm, 1, dm), last.View(j * dm, 1, dm));
        using var hl = Device.Zeros("h_last", seqs, dm);
        using var rl = Device.Zeros("rstd_last", seqs);
        ops.RmsNorm(last, this["model.norm.weight"].Value, hl, rl, c.RmsNormEps);
        var lastRows = Enumerable.Range(0, seqs).Select(j => rowStart[j + 1] - 1).ToArray();
        foreach (var (j0, count, w) in ReplacementRuns(variants, "model.norm.weight", lastRows))
        {
            ops.RmsNorm(last.View(j0 * dm, count, dm), w, hl.View(j0 * dm, count, dm), rl.View(j0, count), c.RmsNormEps);
        }

        using var logits = Device.Zeros("logits", seqs, c.VocabSize);
        ops.Linear(hl, LmHead, logits);
        foreach (var (j0, count, head) in ReplacementRuns(variants, LmHeadParameter.Name, lastRows))
        {
            ops.Linear(hl.View(j0 * dm, count, dm), head, logits.View(j0 * c.VocabSize, count, c.VocabSize));
        }

        var all = logits.ToArray();
        return Enumerable.Range(0, seqs).Select(j => all.AsSpan(j * c.VocabSize, c.VocabSize).ToArray()).ToArray();
    }

    /// <summary>
    /// Runs of consecutive entries of <paramref name="rows"/> whose rows' variants replace <paramref name="parameter"/>
    /// with the same tensor: (index of the run's first entry, entries, the tensor).
    /// </summary>
    private static List<(int Start, int Count, Tensor Value)> ReplacementRuns(IRowVariants? variants, string parameter, IEnumerable<int> rows)
    {
        var runs = new List<(int, int, Tensor)>();
        if (variants == null) return runs;
        int at = 0;
        Tensor? current = null;
        int start = 0;
        foreach (int row in rows)
        {
            var t = variants.Replacement(parameter, row);
            if (!ReferenceEquals(t, current))
            {
                if (current != null) runs.Add((start, at - start, current));
                current = t;
                start = at;
            }

            at++;
        }

        if (current != null) runs.Add((start, at - start, current));
        return runs;
    }

    /// <summary>
    /// Adds a LoRA layer to every module <paramref name="config"/> targets: A (r, in) from PEFT's default init
    /// (uniform in +-1/sqrt(in), i.e. kaiming_uniform with a = sqrt(5)), B (out, r) zero, so the model is unchanged
    /// until B trains; with use_dora, a magnitude m = ||W||_row. Weights come from <paramref name="from"/> where it
    /// has them. With <paramref name="freezeBase"/>, every base parameter stops training; with
    /// <paramref name="trainA"/> false, A stays at its random init and only B (and m) train.
    /// </summary>
    public void AddLora(PeftSharp.Formats.LoraAdapterConfig config, int seed, bool freezeBase = true, PeftSharp.Formats.PeftLoraAdapter? from = null, bool trainA = true)
    {
        var rng = new Random(seed);
        foreach (var module in LoraTargets(config))
        {
            if (lora.ContainsKey(module)) throw new InvalidOperationException($"{module} already has a LoRA layer");
            var (outF, inF) = PeftSharp.Formats.PeftLoraAdapter.LinearShape(Config, module);
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
                    m = LoraMerge.RowNorms(this[module + ".weight"].Value.ToArray(), outF, inF).Select(v => (float)v).ToArray();
                }

                magnitude = new Parameter($"base_model.model.{module}.lora_magnitude_vector", Device.FromArray(module + ".lora_magnitude_vector", m, outF));
            }

            var layer = NewLoraLayer("", module, config, a, b, magnitude);
            layer.A.Trainable = trainA;
            lora[module] = layer;
        }

        if (freezeBase)
        {
            foreach (var p in parameters) p.Trainable = false;
        }
    }

    /// <summary>The modules <paramref name="config"/> targets in this model; an error when none, or when its dropout is out of range.</summary>
    private List<string> LoraTargets(PeftSharp.Formats.LoraAdapterConfig config)
    {
        var targets = config.TargetsIn(Config).ToList();
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
    private LoraLayer NewLoraLayer(string prefix, string module, PeftSharp.Formats.LoraAdapterConfig config, float[] a, float[] b, Parameter? magnitude)
    {
        int r = config.For(module).Rank;
        var (outF, inF) = PeftSharp.Formats.PeftLoraAdapter.LinearShape(Config, module);
        return new LoraLayer(
            new Parameter($"{prefix}base_model.model.{module}.lora_A.weight", Device.FromArray($"{prefix}{module}.lora_A", a, r, inF)),
            new Parameter($"{prefix}base_model.model.{module}.lora_B.weight", Device.FromArray($"{prefix}{module}.lora_B", b, outF, r)),
            r, config.Scale(module), config.LoraDropout, magnitude);
    }

    /// <summary>
    /// Chain of LoRA: merges every LoRA layer into its base weight (W += s B A, or DoRA's rescaled form), then starts
    /// it afresh in place (A from the default init with <paramref name="seed"/>, B = 0, m = ||W||_row), so the model
    /// computes the same function and the optimizer keeps the same parameter objects.
    /// </summary>
    public void MergeLoraAndRestart(int seed)
    {
        var ops = Device.Ops;
        var rng = new Random(seed);
        foreach (var (module, l) in lora)
        {
            var w = this[module + ".weight"].Value;
            int outF = w.Dim(0), inF = w.Dim(1);
            if (l.Magnitude != null)
            {
                var norm = DoraNorms(module, l);
                var m = l.Magnitude.Value.ToArray();
                ops.MatMul(l.B.Value, l.A.Value, w, alpha: l.Scale, beta: 1f);
                var host = w.ToArray();
                for (int i = 0; i < host.Length; i++) host[i] *= (float)(m[i / inF] / norm[i / inF]);
                w.CopyFrom(host);
                l.Magnitude.Value.CopyFrom(LoraMerge.RowNorms(host, outF, inF).Select(v => (float)v).ToArray());
            }
            else
            {
                ops.MatMul(l.B.Value, l.A.Value, w, alpha: l.Scale, beta: 1f);
            }

            l.A.Value.CopyFrom(DefaultLoraA(rng, l.Rank, inF));
            ops.Fill(l.B.Value, 0f);
        }

        loraInit.Clear();
        chainRestarts++;
    }

    /// <summary>How many times <see cref="MergeLoraAndRestart"/> has folded the adapters into the base.</summary>
    public int ChainRestarts => chainRestarts;

    /// <summary>
    /// For initialisations with a non-zero product (LoRA-GA): W -= s B0 A0 keeps the model's function, and the
    /// initial factors are remembered so <see cref="ExportLora"/> can express the adapter against the original base.
    /// </summary>
    public void AbsorbLoraInit(string module, float[] a0, float[] b0)
    {
        var l = lora[module];
        var w = this[module + ".weight"].Value;
        using var ta = Device.FromArray("a0", a0, l.Rank, w.Dim(1));
        using var tb = Device.FromArray("b0", b0, w.Dim(0), l.Rank);
        Device.Ops.MatMul(tb, ta, w, alpha: -l.Scale, beta: 1f);
        loraInit[module] = (a0, b0);
    }

    /// <summary>The initial factors absorbed into the base by <see cref="AbsorbLoraInit"/>, by module (checkpoints carry them).</summary>
    public IReadOnlyDictionary<string, (float[] A0, float[] B0)> LoraInitFactors => loraInit;

    /// <summary>
    /// Remembers initial factors whose product the base weights already hold (a resumed LoRA-GA run: the checkpoint's
    /// weights are W - s B0 A0), without changing the weights again.
    /// </summary>
    public void RestoreLoraInit(string module, float[] a0, float[] b0)
    {
        if (!lora.TryGetValue(module, out var l)) throw new ArgumentException($"initial LoRA factors for {module}, which has no LoRA layer");
        if (a0.Length != l.A.Value.Length || b0.Length != l.B.Value.Length)
        {
            throw new ArgumentException($"initial LoRA factors for {module}: A0 has {a0.Length} values and B0 {b0.Length}, the layer's A and B have {l.A.Value.Length} and {l.B.Value.Length}");
        }

        loraInit[module] = (a0, b0);
    }

    /// <summary>Removes every LoRA layer (after merging them, or to start a fresh one), freeing its tensors.</summary>
    public void RemoveLora()
    {
        foreach (var l in lora.Values)
        {
            foreach (var p in l.Parameters) p.Dispose();
        }

        lora.Clear();
        loraInit.Clear();
    }

    /// <summary>
    /// The LoRA layers as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>). After a LoRA-GA initialisation the base
    /// weights hold W - s B0 A0, so the adapter is exported against the original W: rank 2r with A' = [A; A0] and
    /// B' = [B, -B0], and alpha doubled (sqrt-2 times under rsLoRA) so the scale s stays the same.
    /// </summary>
    public PeftSharp.Formats.PeftLoraAdapter ExportLora(PeftSharp.Formats.LoraAdapterConfig config)
    {
        if (chainRestarts > 0)
        {
            throw new InvalidOperationException($"the base weights have absorbed {chainRestarts} earlier LoRA links (chain of LoRA); the current adapter alone does not reproduce the model: save the model instead");
        }

        var magnitudes = lora.Where(l => l.Value.Magnitude != null).ToDictionary(l => l.Key, l => l.Value.Magnitude!.Value.ToArray());
        if (loraInit.Count == 0) return new(config, lora.ToDictionary(l => l.Key, l => (l.Value.A.Value.ToArray(), l.Value.B.Value.ToArray())), magnitudes);
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

        return new(doubled, modules, magnitudes);
    }

    /// <summary>True when the module's output is its base product alone: no LoRA layer on it and no adapter sets.</summary>
    private bool IsPlain(string module) => setRows == null && !lora.ContainsKey(module);

    /// <summary>
    /// y = x W^T for the module's base weight, then each row's variant delta, then the module's own LoRA (and DoRA)
    /// layer when it has one. x (rows, in), y (rows, out). With <paramref name="keep"/> (training), dropout is applied
    /// to the LoRA branch and what the backward needs is saved.
    /// </summary>
    private void Project(string module, Tensor x, Tensor y, Dictionary<string, LoraSaved>? keep, IRowVariants? variants = null)
    {
        var ops = Device.Ops;
        ops.Linear(x, this[module + ".weight"].Value, y);
        variants?.Apply(module, x, y);
        if (!lora.TryGetValue(module, out var l))
        {
            if (setRows != null) ProjectSets(module, x, y, keep);
            return;
        }

        var saved = new LoraSaved();
        try
        {
            var input = Shrink(module, 0, l, x, keep != null, saved);
            if (l.Magnitude != null && saved.Mask != null)
            {
                // DoRA under dropout, as PEFT computes it: the rescaling applies to the dropped-out input's base
                // product, y = W x + (c - 1) W xd + c s B A xd = W x - W xd + c z, z = W xd + s B A xd (saved).
                var norm = DoraNorms(module, l);
                var m = l.Magnitude.Value.ToArray();
                saved.C = Device.FromArray(module + ".dora_scale", m.Select((v, i) => (float)(v / norm[i])).ToArray(), m.Length);
                saved.InvNorm = Device.FromArray(module + ".dora_inv_norm", norm.Select(v => (float)(1.0 / v)).ToArray(), m.Length);
                saved.Z = Device.Zeros(module + ".dora_z", y.Shape.ToArray());
                using var wxd = Device.Zeros(module + ".dora_w_xd", y.Shape.ToArray());
                ops.Linear(input, this[module + ".weight"].Value, wxd);
                ops.Copy(wxd, saved.Z);
                ops.MatMul(saved.T, l.B.Value, saved.Z, transposeB: true, alpha: l.Scale, beta: 1f);
                ops.Axpy(-1f, wxd, y);
                ops.ScaleColumns(saved.Z, saved.C, wxd);
                ops.Add(y, wxd, y);
                if (keep != null) keep[module] = saved;
                else saved.Dispose();
                return;
            }

            ops.MatMul(saved.T, l.B.Value, y, transposeB: true, alpha: l.Scale, beta: 1f);
            if (l.Magnitude != null)
            {
                var norm = DoraNorms(module, l);
                var m = l.Magnitude.Value.ToArray();
                saved.C = Device.FromArray(module + ".dora_scale", m.Select((v, i) => (float)(v / norm[i])).ToArray(), m.Length);
                saved.InvNorm = Device.FromArray(module + ".dora_inv_norm", norm.Select(v => (float)(1.0 / v)).ToArray(), m.Length);
                if (keep != null)
                {
                    saved.Z = Device.Zeros(module + ".dora_z", y.Shape.ToArray());
                    ops.Copy(y, saved.Z);
                }

                ops.ScaleColumns(y, saved.C, y);
            }
        }
        catch
        {
            saved.Dispose();
            throw;
        }

        if (keep != null) keep[module] = saved;
        else saved.Dispose();
    }

    /// <summary>
    /// The low-rank path's first half for <paramref name="x"/> (rows, in): dropout when training (mask and x_dropped kept
    /// in <paramref name="saved"/>), then t = x A^T into saved.T. Returns the LoRA input (x or x_dropped).
    /// </summary>
    private Tensor Shrink(string module, int salt, LoraLayer l, Tensor x, bool training, LoraSaved saved)
    {
        var ops = Device.Ops;
        int rows = x.Dim(0);
        var input = x;
        if (training && l.Dropout > 0f)
        {
            saved.Mask = Device.FromArray(module + ".dropout_mask", DropoutMask(module, rows * x.Dim(1), l.Dropout, salt), rows, x.Dim(1));
            saved.XDropped = Device.Zeros(module + ".x_dropped", rows, x.Dim(1));
            ops.Mul(x, saved.Mask, saved.XDropped);
            input = saved.XDropped;
        }

        saved.T = Device.Zeros(module + ".lora_t", rows, l.Rank);
        ops.Linear(input, l.A.Value, saved.T);
        return input;
    }

    /// <summary>Each adapter set's low-rank path on its own rows (contiguous, in set order), added to y.</summary>
    private void ProjectSets(string module, Tensor x, Tensor y, Dictionary<string, LoraSaved>? keep)
    {
        int inF = x.Dim(1), outF = y.Dim(1);
        foreach (var (k, l, r0, rows) in SetSegments(module, setRows!))
        {
            var saved = new LoraSaved();
            try
            {
                Shrink(module, k + 1, l, x.View(r0 * inF, rows, inF), keep != null, saved);
                Device.Ops.MatMul(saved.T, l.B.Value, y.View(r0 * outF, rows, outF), transposeB: true, alpha: l.Scale, beta: 1f);
            }
            catch
            {
                saved.Dispose();
                throw;
            }

            if (keep != null) keep[$"{module}#{k}"] = saved;
            else saved.Dispose();
        }
    }

    /// <summary>Each adapter set with a layer on <paramref name="module"/>, and its rows [Row0, Row0 + Rows) of the pass (sets in order, rows contiguous).</summary>
    private IEnumerable<(int Set, LoraLayer Layer, int Row0, int Rows)> SetSegments(string module, int[] rowsPerSet)
    {
        int r0 = 0;
        for (int k = 0; k < loraSets.Count; k++)
        {
            if (rowsPerSet[k] > 0 && loraSets[k].Layers.TryGetValue(module, out var l)) yield return (k, l, r0, rowsPerSet[k]);
            r0 += rowsPerSet[k];
        }
    }

    /// <summary>||W + s B A|| of every output row (out), in double: DoRA's column norm, a constant to the backward.</summary>
    private double[] DoraNorms(string module, LoraLayer l) =>
        LoraMerge.MergedRowNorms(this[module + ".weight"].Value, l.A.Value, l.B.Value, l.Scale).Select(v => Math.Max(v, 1e-12)).ToArray();

    /// <summary>Inverted dropout: each entry is 0 with probability p, else 1 / (1 - p); seeded by DropoutSeed and the module.</summary>
    private float[] DropoutMask(string module, int length, float p, int salt = 0)
    {
        int moduleIndex = PeftSharp.Formats.LoraAdapterConfig.LlamaLinearModules(Config).TakeWhile(m => m != module).Count();
        var rng = new Random(unchecked(DropoutSeed * 1_000_003 + moduleIndex * 7919 + 17 + salt * 104_729));
        float keep = 1f / (1f - p);
        var mask = new float[length];
        for (int i = 0; i < length; i++) mask[i] = rng.NextDouble() < p ? 0f : keep;
        return mask;
    }

    /// <summary>
    /// Backward of <see cref="Project"/>: for DoRA, dm += sum_rows(dy * z) / norm and dy becomes dy * m / norm; then
    /// dx = dy W (+ s (dy B) A, masked by dropout), dW += dy^T x when trainable, dB += s dy^T t, dA += (s dy B)^T x_dropped.
    /// </summary>
    private void ProjectBackward(string module, Tensor x, Tensor dy, Tensor dx, Pass pass)
    {
        var ops = Device.Ops;
        if (!lora.TryGetValue(module, out var l))
        {
            ops.LinearBackward(x, this[module + ".weight"].Value, dy, dx, GradOf(module + ".weight"), accumulateWeight: true);
            if (pass.SetRows != null)
            {
                int inF = x.Dim(1), outF = dy.Dim(1);
                foreach (var (k, lk, r0, count) in SetSegments(module, pass.SetRows))
                {
                    ExpandBackward(module, lk, pass.Lora[$"{module}#{k}"], x.View(r0 * inF, count, inF), dy.View(r0 * outF, count, outF), dx.View(r0 * inF, count, inF));
                }
            }

            return;
        }

        var saved = pass.Lora[module];
        int rows = x.Dim(0);
        Tensor? scaledDy = null;
        try
        {
            if (l.Magnitude != null)
            {
                if (l.Magnitude.Trainable)
                {
                    using var prod = Device.Zeros(module + ".dora_dy_z", dy.Shape.ToArray());
                    ops.Mul(dy, saved.Z!, prod);
                    using var ones = Device.FromArray("ones", Enumerable.Repeat(1f, rows).ToArray(), 1, rows);
                    using var colSum = Device.Zeros(module + ".dora_dm", 1, dy.Dim(1));
                    ops.MatMul(ones, prod, colSum);
                    ops.ScaleColumns(colSum, saved.InvNorm!, colSum);
                    ops.Axpy(1f, colSum.Reshape(dy.Dim(1)), l.Magnitude.Grad);
                }

                scaledDy = Device.Zeros(module + ".dora_dy", dy.Shape.ToArray());
                ops.ScaleColumns(dy, saved.C!, scaledDy);
                if (saved.Mask != null)
                {
                    // Under dropout (see Project): W x takes dy; the dropped-out input's paths take g = c dy (z) and
                    // -dy (the subtracted W xd), so W xd's factor is g - dy, and the low-rank path's g.
                    ops.LinearBackward(x, this[module + ".weight"].Value, dy, dx, GradOf(module + ".weight"), accumulateWeight: true);
                    using var h = Device.Zeros(module + ".dora_dy_minus", dy.Shape.ToArray());
                    ops.Copy(scaledDy, h);
                    ops.Axpy(-1f, dy, h);
                    using var dxd = Device.Zeros(module + ".dora_dxd", x.Shape.ToArray());
                    ops.LinearBackward(saved.XDropped!, this[module + ".weight"].Value, h, dxd, GradOf(module + ".weight"), accumulateWeight: true);
                    if (l.B.Trainable) ops.MatMul(scaledDy, saved.T, l.B.Grad, transposeA: true, alpha: l.Scale, beta: 1f);
                    using var dtd = Device.Zeros(module + ".lora_dt", rows, l.Rank);
                    ops.MatMul(scaledDy, l.B.Value, dtd, alpha: l.Scale);
                    if (l.A.Trainable) ops.MatMul(dtd, saved.XDropped!, l.A.Grad, transposeA: true, beta: 1f);
                    ops.MatMul(dtd, l.A.Value, dxd, beta: 1f);
                    ops.Mul(dxd, saved.Mask, dxd);
                    ops.Add(dx, dxd, dx);
                    return;
                }

                dy = scaledDy;
            }

            ops.LinearBackward(x, this[module + ".weight"].Value, dy, dx, GradOf(module + ".weight"), accumulateWeight: true);
            ExpandBackward(module, l, saved, x, dy, dx);
        }
        finally
        {
            scaledDy?.Dispose();
        }
    }

    /// <summary>The low-rank path's backward: dB += s dy^T t, dA += (s dy B)^T x_dropped, dx += (s dy B) A (masked by dropout).</summary>
    private void ExpandBackward(string module, LoraLayer l, LoraSaved saved, Tensor x, Tensor dy, Tensor dx)
    {
        var ops = Device.Ops;
        if (l.B.Trainable) ops.MatMul(dy, saved.T, l.B.Grad, transposeA: true, alpha: l.Scale, beta: 1f);
        using var dt = Device.Zeros(module + ".lora_dt", x.Dim(0), l.Rank);
        ops.MatMul(dy, l.B.Value, dt, alpha: l.Scale);
        if (l.A.Trainable) ops.MatMul(dt, saved.XDropped ?? x, l.A.Grad, transposeA: true, beta: 1f);
        if (saved.Mask == null)
        {
            ops.MatMul(dt, l.A.Value, dx, beta: 1f);
        }
        else
        {
            using var dxLora = Device.Zeros(module + ".lora_dx", x.Shape.ToArray());
            ops.MatMul(dt, l.A.Value, dxLora);
            ops.Mul(dxLora, saved.Mask, dxLora);
            ops.Add(dx, dxLora, dx);
        }
    }

    public void ZeroGrad()
    {
        foreach (var p in AllParameters) p.ZeroGrad();
    }

    public void Dispose()
    {
        foreach (var p in AllParameters) p.Dispose();
        prefix?.Dispose();
        prefix = null;
        lora.Clear();
        parameters.Clear();
        byName.Clear();
    }
}
