using PeftSharp.Adapters;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Variants;
using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// A Llama-family decoder (transformers' LlamaForCausalLM) over the engine's Ops: token embedding, pre-norm blocks of
/// RMSNorm, rotary grouped-query causal attention and a SwiGLU MLP with residuals, a final norm and the LM head (tied
/// to the embedding or not). Parameters carry Hugging Face's names. Forward and backward run on any device; the
/// backward is written out op by op, reusing the activations the forward saved.
/// Threads: generation (BatchGenerator, Generator, a VariantSet's registrations) is safe from several threads and
/// takes turns on <see cref="GenerationLock"/>; training and the direct forward calls (Logits, Loss, DecodeBatch) use
/// the model's saved activations and gradients, so one thread at a time drives them.
/// Shapes: B batch, T tokens per sequence, N = B * T, Dm hidden, H/Hkv heads, D head dim, I intermediate, V vocab.
/// </summary>
public sealed class LlamaModel : IDisposable
{
    private readonly LlamaWeights weights;
    private readonly Dictionary<string, Linear> linears = new();
    private readonly DecoderLayer[] layers;
    private readonly LoraAdapters loras;
    private VirtualPrefix? prefix;
    private Lazy<ITokenizer>? tokenizer;

    private LlamaModel(Device device, LlamaConfig config, LlamaWeights weights)
    {
        Device = device;
        Config = config;
        this.weights = weights;
        int moduleIndex = 0;
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(config))
        {
            linears[module] = new Linear(module, moduleIndex++, weights[module + ".weight"], weights.Has(module + ".bias") ? weights[module + ".bias"] : null);
        }

        loras = new LoraAdapters(this, m => linears[m]);
        layers = Enumerable.Range(0, config.NumHiddenLayers).Select(i => new DecoderLayer(i, config, n => weights[n], m => linears[m])).ToArray();
    }

    public Device Device { get; }

    /// <summary>Held for a whole generation and by a VariantSet's changes: one model's generations take turns.</summary>
    public Lock GenerationLock { get; } = new();

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
            : throw new InvalidOperationException($"the model has vocab_size {Config.VocabSize} and no tokenizer: load it from a folder with {HfTokenizer.JsonFile} or " +
                $"{HfTokenizer.SentencePieceFile}, or set Tokenizer (only vocab_size {ByteTokenizer.VocabSize} models use the built-in byte tokenizer)"));
        set
        {
            var checkedValue = CheckTokenizer(value);
            tokenizer = new Lazy<ITokenizer>(() => checkedValue);
        }
    }

    /// <summary>
    /// Tokens that end a generation besides the tokenizer's EOS: generation_config.json's eos_token_id when the model
    /// was loaded from a folder (Llama 3.1 and 3.2 list three: end_of_text, eom and eot).
    /// </summary>
    public IReadOnlyList<int> StopTokens { get; set; } = Array.Empty<int>();

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
            throw new PeftSharpInputException($"tokenizer {t.Name} produces ids up to {t.VocabSize - 1}, but the model's vocab_size is {Config.VocabSize}");
        }

        return t;
    }

    /// <summary>The base model's parameters (what a Hugging Face folder holds).</summary>
    public IReadOnlyList<Parameter> Parameters => weights.All;

    /// <summary>LoRA layers by module path (model.layers.0.self_attn.q_proj).</summary>
    public IReadOnlyDictionary<string, LoraLayer> Lora => loras.Layers;

    /// <summary>Everything an optimizer steps: the base parameters, the LoRA matrices, IA3's and SSF's vectors and a prefix.</summary>
    public IEnumerable<Parameter> AllParameters =>
        weights.All.Concat(loras.Parameters).Concat(ia3.Values.SelectMany(l => l.Parameters)).Concat(ssf.Values.SelectMany(l => l.Parameters))
            .Concat(prefix?.Parameters ?? Array.Empty<Parameter>());

    /// <summary>SSF layers by module path.</summary>
    public IReadOnlyDictionary<string, SsfLayer> Ssf => ssf;

    private readonly Dictionary<string, SsfLayer> ssf = new();

    /// <summary>
    /// Adds an SSF layer after every module in <paramref name="modules"/> (gamma = 1, beta = 0 or <paramref name="from"/>'s)
    /// and freezes the base. A module with a bias (Qwen2's q/k/v) is refused: SSF scales W x + b there.
    /// </summary>
    public void AddSsf(IReadOnlyList<string> modules, SsfAdapter? from = null)
    {
        RequireNoAdapter("SSF");
        foreach (var module in modules)
        {
            if (!linears.TryGetValue(module, out var linear)) throw new ArgumentException($"SSF: {module} is not a linear module of this model");
            if (linear.Bias != null) throw new NotSupportedException($"SSF on {module}: training it after a module that has a bias is not supported");
        }

        Attach(ssf, modules.Select(module =>
        {
            int outF = PeftLoraAdapter.LinearShape(Config, module).Out;
            var (scale, shift) = from != null && from.Modules.TryGetValue(module, out var f) ? f : (Enumerable.Repeat(1f, outF).ToArray(), new float[outF]);
            return new SsfLayer(module, new Parameter(module + ".ssf_scale", Device.FromArray(module + ".ssf_scale", scale, outF)),
                new Parameter(module + ".ssf_shift", Device.FromArray(module + ".ssf_shift", shift, outF)));
        }).ToList(), l => l.Module);
    }

    /// <summary>The SSF layers as an SSF adapter folder's contents.</summary>
    public SsfAdapter ExportSsf() => new(ssf.ToDictionary(l => l.Key, l => (l.Value.Scale.Value.ToArray(), l.Value.Shift.Value.ToArray())));

    /// <summary>IA3 layers by module path.</summary>
    public IReadOnlyDictionary<string, Ia3Layer> Ia3 => ia3;

    private readonly Dictionary<string, Ia3Layer> ia3 = new();

    /// <summary>
    /// Adds an IA3 layer to every module <paramref name="config"/> targets, its vector l from <paramref name="from"/>
    /// or PEFT's init (ones: the model unchanged), and freezes the base. An output-scaled module with a bias (Qwen2's
    /// q/k/v) is refused: PEFT scales W x + b there, which the bias added after the adapter would not be.
    /// </summary>
    public void AddIa3(Ia3Config config, PeftIa3Adapter? from = null)
    {
        RequireNoAdapter("IA3");
        var targets = config.TargetsIn(Config).ToList();
        if (targets.Count == 0) throw new ArgumentException($"IA3 target_modules [{string.Join(", ", config.TargetModules)}{config.TargetRegex}] match no module of this model");
        if (targets.FirstOrDefault(m => !config.IsFeedForward(m) && linears[m].Bias != null) is { } biased)
        {
            throw new NotSupportedException($"IA3 on {biased}: training an output-scaled module that has a bias is not supported");
        }

        Attach(ia3, targets.Select(module =>
        {
            bool ff = config.IsFeedForward(module);
            var (outF, inF) = PeftLoraAdapter.LinearShape(Config, module);
            var values = from != null && from.Vectors.TryGetValue(module, out var v) ? v : Enumerable.Repeat(1f, ff ? inF : outF).ToArray();
            return new Ia3Layer(module, new Parameter($"base_model.model.{module}.ia3_l", Device.FromArray(module + ".ia3_l", values, values.Length)), ff);
        }).ToList(), l => l.Module);
    }

    /// <summary>Refuses a second kind of adapter layer: each linear module runs one (LoRA, IA3 or SSF), and prefix tuning goes alone.</summary>
    private void RequireNoAdapter(string method)
    {
        if (loras.Layers.Count > 0 || loras.Sets.Count > 0 || prefix != null || ia3.Count > 0 || ssf.Count > 0)
        {
            throw new InvalidOperationException($"{method} goes on a model without LoRA, adapter sets, prefix tuning, IA3 or SSF layers");
        }
    }

    /// <summary>Puts each layer (built after every check passed) on its linear module and freezes the base.</summary>
    private void Attach<T>(Dictionary<string, T> into, IReadOnlyList<T> layers, Func<T, string> module) where T : IAdapterLayer
    {
        foreach (var layer in layers)
        {
            into[module(layer)] = layer;
            linears[module(layer)].Adapter = layer;
        }

        foreach (var p in weights.All) p.Trainable = false;
    }

    /// <summary>The IA3 layers as a PEFT IA3 adapter (for <c>PeftIa3Adapter.Save</c>).</summary>
    public PeftIa3Adapter ExportIa3(Ia3Config config) => new(config, ia3.ToDictionary(l => l.Key, l => l.Value.Vector.Value.ToArray()));

    /// <summary>The adapters trained together, in the order a set-batched loss takes its sequences.</summary>
    public IReadOnlyList<LoraSet> LoraSets => loras.Sets;

    /// <summary>
    /// Adds one of several LoRA adapters trained in the same batch over the frozen base: each sequence of a batch
    /// belongs to one adapter (<see cref="Loss(int[], int[], int, bool, IReadOnlyList{int})"/>), the base product runs
    /// once for all rows, and each adapter's low-rank path runs on its own contiguous rows (segments, as Punica's SGMV
    /// lays a batch out). Same initialisation as <see cref="AddLora"/>; DoRA is not supported here.
    /// </summary>
    public void AddLoraSet(string name, LoraAdapterConfig config, int seed)
    {
        if (prefix != null) throw new InvalidOperationException("adapter sets together with prefix tuning are not supported");
        if (ia3.Count > 0 || ssf.Count > 0) throw new InvalidOperationException("adapter sets go on a model without IA3 or SSF layers (each linear module runs one adapter)");
        loras.AddSet(name, config, seed);
    }

    /// <summary>One adapter of the set as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>).</summary>
    public PeftLoraAdapter ExportLoraSet(string name) => loras.ExportSet(name);

    /// <summary>
    /// Mean cross-entropy of a batch whose sequences belong to the adapter sets: the first
    /// <paramref name="sequencesPerSet"/>[0] sequences to set 0, the next to set 1, and so on. With
    /// <paramref name="backward"/>, each adapter's gradients come from its own rows only.
    /// </summary>
    public (double Loss, int Counted) Loss(int[] tokens, int[] targets, int batch, bool backward, IReadOnlyList<int> sequencesPerSet)
    {
        if (sequencesPerSet.Count != loras.Sets.Count) throw new ArgumentException($"{sequencesPerSet.Count} sequence counts for {loras.Sets.Count} adapter sets");
        if (sequencesPerSet.Any(c => c < 0)
            || sequencesPerSet.Sum() != batch) throw new ArgumentException($"sequence counts [{string.Join(", ", sequencesPerSet)}] do not add up to the batch of {batch}");
        if (batch <= 0 || tokens.Length % batch != 0) throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        if (targets.Length != tokens.Length) throw new ArgumentException($"targets has {targets.Length} entries for {tokens.Length} tokens");
        var setRows = sequencesPerSet.Select(c => c * (tokens.Length / batch)).ToArray();
        return CrossEntropyLoss(tokens, targets, new BatchLayout(batch, tokens.Length / batch, prefix, Config.AttentionWindow), backward, setRows: setRows);
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
        prefix = VirtualPrefix.Create(Device, Config, tokens, seed, keys, values, projectionHidden);
        foreach (var p in weights.All) p.Trainable = false;
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

        return CrossEntropyLoss(tokens, targets, new GroupedLayout(shared, g, each, prefix, Config.AttentionWindow), backward, gradientWeight);
    }

    /// <summary>
    /// Seeds the LoRA dropout masks of the next training forward pass (a trainer sets it from its seed and step, so
    /// a resumed run draws the same masks as an uninterrupted one).
    /// </summary>
    public int DropoutSeed { get; set; }

    public Parameter this[string name] => weights[name];

    public bool Has(string name) => weights.Has(name);

    public long ParameterCount => weights.All.Sum(p => (long)p.Value.Length);

    /// <summary>The Hugging Face names and shapes of every parameter this config has, in checkpoint order.</summary>
    public static IEnumerable<(string Name, int[] Shape)> ParameterShapes(LlamaConfig c) => LlamaWeights.Shapes(c);

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
        ModelMemory.EnsureWeightsFit(device, config, "config");
        return new LlamaModel(device, config, LlamaWeights.FromTensors(device, config, values));
    }

    /// <summary>Builds a model whose parameter values <paramref name="fill"/> writes in place (a loader: no array per tensor).</summary>
    public static LlamaModel FromTensors(Device device, LlamaConfig config, TensorFill fill)
    {
        config.Validate();
        ModelMemory.EnsureWeightsFit(device, config, "config");
        return new LlamaModel(device, config, LlamaWeights.FromTensors(device, config, fill));
    }

    /// <summary>A standard normal draw (Box-Muller) from <paramref name="rng"/>: every seeded initialisation uses it.</summary>
    internal static double Gaussian(Random rng)
    {
        double u1 = 1.0 - rng.NextDouble();
        double u2 = rng.NextDouble();
        return Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
    }

    private Tensor LmHead => weights.LmHead.Value;

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

        return CrossEntropyLoss(tokens, targets, new BatchLayout(batch, tokens.Length / batch, prefix, Config.AttentionWindow), backward);
    }

    /// <summary>Mean cross-entropy over the counted targets of a pass in <paramref name="layout"/>, with its backward.</summary>
    private (double Loss, int Counted) CrossEntropyLoss(int[] tokens, int[] targets, AttentionLayout layout, bool backward, float gradientWeight = 1f, int[]? setRows = null)
    {
        var ops = Device.Ops;
        using var pass = Forward(tokens, layout, keepActivations: backward, setRows);
        using var tgt = Device.FromIndices("targets", targets);
        using var losses = Device.Zeros("losses", tokens.Length);
        int counted = ops.CrossEntropy(pass.Logits, tgt, losses);
        double loss = counted == 0 ? 0 : ops.Sum(losses) / counted;
        if (backward && counted > 0)
        {
            // dL/dlogits overwrites the logits, which nothing reads after the loss (each row's softmax is taken before
            // it is written, on every backend): one (N, V) array fewer at the step's peak, 328 MB for 4 x 160 positions
            // of a 128K vocabulary.
            ops.CrossEntropyBackward(pass.Logits, tgt, pass.Logits, gradientWeight / counted);
            Backward(pass, pass.Logits);
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

    /// <summary>A full-sequence pass: its layers' activations (when kept), the final norm and the logits.</summary>
    private sealed class Pass : IDisposable
    {
        public Pass(LayerPass layers, IndexTensor ids)
        {
            Run = layers;
            Ids = ids;
        }

        public LayerPass Run { get; }
        public IndexTensor Ids { get; }
        public int Tokens => Ids.Length;
        public List<LayerActivations> Layers = new();
        public Tensor XFinal = null!, HFinal = null!, RstdFinal = null!, Logits = null!;

        public void Dispose()
        {
            Run.Linears.Dispose();
            foreach (var l in Layers) l.Dispose();
            foreach (var t in new IDisposable?[] { Ids, Run.Positions, XFinal, HFinal, RstdFinal, Logits }) t?.Dispose();
        }
    }

    private Pass Forward(int[] tokens, int batch, bool keepActivations)
    {
        if (batch <= 0 || tokens.Length % batch != 0)
        {
            throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        }

        return Forward(tokens, new BatchLayout(batch, tokens.Length / batch, prefix, Config.AttentionWindow), keepActivations);
    }

    private Pass Forward(int[] tokens, AttentionLayout layout, bool keepActivations, int[]? setRows = null)
    {
        var c = Config;
        int n = tokens.Length, dm = c.HiddenSize;
        if (layout.Rows != n) throw new ArgumentException($"{n} tokens for an attention layout of {layout.Rows} rows");
        int maxPosition = n == 0 ? 0 : layout.Positions.Max() + 1;
        if (maxPosition > c.ContextLimit)
        {
            throw new ArgumentException($"sequence length {maxPosition} exceeds {c.ContextLimitText}");
        }

        var ops = Device.Ops;
        prefix?.Materialize(); // a reparameterised prefix is recomputed from its (possibly just stepped) MLP
        var ids = Device.FromIndices("input_ids", tokens);
        Pass pass;
        try
        {
            pass = new Pass(new LayerPass(layout, Device.FromIndices("positions", layout.Positions), new LinearPass(keepActivations, DropoutSeed, setRows: setRows), keepActivations), ids);
        }
        catch
        {
            ids.Dispose();
            throw;
        }

        try
        {
            var x = Device.Zeros("x0", n, dm);
            ops.Embedding(pass.Ids, weights.Embedding.Value, x);
            pass.XFinal = x; // the residual stream so far: disposed with the pass even if a layer throws (disposal is idempotent)
            foreach (var layer in layers)
            {
                var a = new LayerActivations();
                pass.Layers.Add(a);
                x = pass.XFinal = layer.Forward(x, pass.Run, a);
                if (!keepActivations)
                {
                    pass.Layers.Remove(a);
                    a.Dispose();
                }
            }

            pass.HFinal = Device.Empty("h_final", n, dm);
            pass.RstdFinal = Device.Zeros("rstd_final", n);
            ops.RmsNorm(x, weights.FinalNorm.Value, pass.HFinal, pass.RstdFinal, c.RmsNormEps);
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

    /// <summary>Backpropagates dL/dlogits (N, V) through the pass, adding into every trainable parameter's Grad.</summary>
    private void Backward(Pass pass, Tensor dLogits)
    {
        var c = Config;
        var ops = Device.Ops;
        int n = pass.Tokens, dm = c.HiddenSize;
        var head = weights.LmHead;
        using var dh = Device.Zeros("dh_final", n, dm);
        ops.LinearBackward(pass.HFinal, LmHead, dLogits, dh, head.Trainable ? head.Grad : null, accumulateWeight: true);
        using var dx = Device.Zeros("dx", n, dm);
        DecoderLayer.AddNormBackward(dh, pass.XFinal, weights.FinalNorm, pass.RstdFinal, dx, accumulateInput: false);
        using (var scratch = new BackwardScratch(Device, n, dm, c.IntermediateSize))
        {
            for (int i = layers.Length - 1; i >= 0; i--) layers[i].Backward(pass.Layers[i], dx, pass.Run, scratch);
        }

        if (prefix?.Projection != null) prefix.Projection.Backward(prefix);
        var embed = weights.Embedding;
        if (embed.Trainable)
        {
            using var dEmbed = Device.Zeros("dembed", c.VocabSize, dm);
            ops.EmbeddingBackward(pass.Ids, dx, dEmbed);
            ops.Axpy(1f, dEmbed, embed.Grad);
        }
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
    public float[][] DecodeBatch(IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IRowVariants? variants = null, IReadOnlyList<KvCache?>? prefixes = null) =>
        DecodeRows(caches, newTokens, variants, prefixes, everyRow: false);

    /// <summary>
    /// <see cref="DecodeBatch"/> returning the logits (V) of every new token, not only each sequence's last: rows in
    /// batch order (sequence 0's tokens, then sequence 1's). Scoring many variants' held-out loss in one mixed batch.
    /// </summary>
    public float[][] DecodeBatchEveryPosition(IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IRowVariants? variants = null) =>
        DecodeRows(caches, newTokens, variants, null, everyRow: true);

    /// <summary>
    /// <see cref="DecodeBatch"/> with <paramref name="betweenLayers"/> told, after each decoder layer, the layer's
    /// index, the stream it read (N, Dm) and the stream it wrote, which the hook may rewrite in place before the next
    /// layer reads it (TuCo's decomposition sets every row pair's input to the fine-tuned stream); first, with index
    /// -1, the embedded stream (both arguments), before layer 0 reads it.
    /// </summary>
    internal float[][] DecodeBatchWithLayerHook(IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IRowVariants? variants, Action<int, Tensor, Tensor> betweenLayers) =>
        DecodeRows(caches, newTokens, variants, null, everyRow: false, betweenLayers);

    private float[][] DecodeRows(IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IRowVariants? variants, IReadOnlyList<KvCache?>? prefixes, bool everyRow,
        Action<int, Tensor, Tensor>? betweenLayers = null)
    {
        var c = Config;
        var layout = new CacheLayout(c, caches, newTokens, prefixes, prefix);
        prefix?.Materialize();
        int n = layout.Rows, seqs = layout.Sequences, dm = c.HiddenSize;
        if (variants != null && variants.Rows != n) throw new ArgumentException($"DecodeBatch: the variant batch covers {variants.Rows} rows, the step has {n}");
        var ops = Device.Ops;
        var flatIds = newTokens.SelectMany(t => t).ToArray();
        using var ids = Device.FromIndices("input_ids", flatIds);
        using var positions = Device.FromIndices("positions", layout.Positions);
        using var linearPass = new LinearPass(training: false, DropoutSeed, variants);
        var run = new LayerPass(layout, positions, linearPass, keepActivations: false);
        var x = Device.Zeros("x", n, dm);
        try
        {
            ops.Embedding(ids, weights.Embedding.Value, x);
            foreach (var (r0, rows, table) in VariantRuns.Replacements(variants, weights.Embedding.Name, Enumerable.Range(0, n)))
            {
                using var runIds = Device.FromIndices("input_ids_variant", flatIds.AsSpan(r0, rows));
                ops.Embedding(runIds, table, x.View(r0 * dm, rows, dm));
            }

            betweenLayers?.Invoke(-1, x, x);
            foreach (var layer in layers)
            {
                using var a = new LayerActivations(); // its X is the stream the layer replaced, if it did not add in place
                using var before = betweenLayers != null ? Device.Zeros("x_before", n, dm) : null;
                if (before != null) ops.Copy(x, before);
                x = layer.Forward(x, run, a);
                if (before != null) betweenLayers!(layer.Index, before, x);
            }

            layout.Commit();
            var lastRows = everyRow ? Enumerable.Range(0, n).ToArray() : layout.LastRows;
            seqs = lastRows.Length;
            using var last = Device.Zeros("x_last", seqs, dm);
            for (int j = 0; j < seqs; j++) ops.Copy(x.View(lastRows[j] * dm, 1, dm), last.View(j * dm, 1, dm));
            using var hl = Device.Zeros("h_last", seqs, dm);
            using var rl = Device.Zeros("rstd_last", seqs);
            DecoderLayer.NormWithVariants(last, weights.FinalNorm, hl, rl, variants, c.RmsNormEps, lastRows);

            using var logits = Device.Zeros("logits", seqs, c.VocabSize);
            ops.Linear(hl, LmHead, logits);
            foreach (var (j0, count, head) in VariantRuns.Replacements(variants, weights.LmHead.Name, lastRows))
            {
                ops.Linear(hl.View(j0 * dm, count, dm), head, logits.View(j0 * c.VocabSize, count, c.VocabSize));
            }

            // Each row straight into its own array (one host copy, not a whole-batch array and then the rows: at 8 rows of a
            // 128K vocabulary that was 4 MB of large-object garbage a step, and fresh pages to zero).
            var result = new float[seqs][];
            for (int j = 0; j < seqs; j++)
            {
                using var row = logits.View(j * c.VocabSize, c.VocabSize);
                result[j] = row.ToArray();
            }

            return result;
        }
        finally
        {
            x.Dispose();
        }
    }

    /// <summary>
    /// Adds a LoRA layer to every module <paramref name="config"/> targets: A (r, in) from PEFT's default init
    /// (uniform in +-1/sqrt(in), i.e. kaiming_uniform with a = sqrt(5)), B (out, r) zero, so the model is unchanged
    /// until B trains; with use_dora, a magnitude m = ||W||_row. Weights come from <paramref name="from"/> where it
    /// has them. With <paramref name="freezeBase"/>, every base parameter stops training; with
    /// <paramref name="trainA"/> false, A stays at its random init and only B (and m) train.
    /// </summary>
    public void AddLora(LoraAdapterConfig config, int seed, bool freezeBase = true, PeftLoraAdapter? from = null, bool trainA = true)
    {
        if (ia3.Count > 0 || ssf.Count > 0) throw new InvalidOperationException("LoRA goes on a model without IA3 or SSF layers (each linear module runs one adapter)");
        loras.Add(config, seed, freezeBase, from, trainA);
    }

    /// <summary>
    /// Chain of LoRA: merges every LoRA layer into its base weight (W += s B A, or DoRA's rescaled form), then starts
    /// it afresh in place (A from the default init with <paramref name="seed"/>, B = 0, m = ||W||_row), so the model
    /// computes the same function and the optimizer keeps the same parameter objects.
    /// </summary>
    public void MergeLoraAndRestart(int seed) => loras.MergeAndRestart(seed);

    /// <summary>How many times <see cref="MergeLoraAndRestart"/> has folded the adapters into the base.</summary>
    public int ChainRestarts => loras.ChainRestarts;

    /// <summary>
    /// For initialisations with a non-zero product (LoRA-GA): W -= s B0 A0 keeps the model's function, and the
    /// initial factors are remembered so <see cref="ExportLora"/> can express the adapter against the original base.
    /// </summary>
    public void AbsorbLoraInit(string module, float[] a0, float[] b0) => loras.AbsorbInit(module, a0, b0);

    /// <summary>The initial factors absorbed into the base by <see cref="AbsorbLoraInit"/>, by module (checkpoints carry them).</summary>
    public IReadOnlyDictionary<string, (float[] A0, float[] B0)> LoraInitFactors => loras.InitFactors;

    /// <summary>
    /// Remembers initial factors whose product the base weights already hold (a resumed LoRA-GA run: the checkpoint's
    /// weights are W - s B0 A0), without changing the weights again.
    /// </summary>
    public void RestoreLoraInit(string module, float[] a0, float[] b0) => loras.RestoreInit(module, a0, b0);

    /// <summary>Removes every LoRA layer (after merging them, or to start a fresh one), freeing its tensors.</summary>
    public void RemoveLora() => loras.Remove();

    /// <summary>
    /// The LoRA layers as a PEFT adapter (for <c>PeftLoraAdapter.Save</c>). After a LoRA-GA initialisation the base
    /// weights hold W - s B0 A0, so the adapter is exported against the original W: rank 2r with A' = [A; A0] and
    /// B' = [B, -B0], and alpha doubled (sqrt-2 times under rsLoRA) so the scale s stays the same.
    /// </summary>
    public PeftLoraAdapter ExportLora(LoraAdapterConfig config) => loras.Export(config);

    public void ZeroGrad()
    {
        foreach (var p in AllParameters) p.ZeroGrad();
    }

    public void Dispose()
    {
        foreach (var p in AllParameters) p.Dispose();
        prefix?.Dispose();
        prefix = null;
        weights.Dispose();
    }
}
