using PeftSharp.Engine;

namespace PeftSharp.Model;

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

    private LlamaModel(Device device, LlamaConfig config)
    {
        Device = device;
        Config = config;
    }

    public Device Device { get; }

    public LlamaConfig Config { get; }

    public IReadOnlyList<Parameter> Parameters => parameters;

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

    private Tensor LmHead => (Config.TieWordEmbeddings ? this["model.embed_tokens.weight"] : this["lm_head.weight"]).Value;

    private Parameter LmHeadParameter => Config.TieWordEmbeddings ? this["model.embed_tokens.weight"] : this["lm_head.weight"];

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

        var ops = Device.Ops;
        using var pass = Forward(tokens, batch, keepActivations: backward);
        using var tgt = Device.FromIndices("targets", targets);
        using var losses = Device.Zeros("losses", tokens.Length);
        int counted = ops.CrossEntropy(pass.Logits, tgt, losses);
        double loss = counted == 0 ? 0 : ops.Sum(losses) / counted;
        if (backward && counted > 0) Backward(pass, tgt, counted);
        return (loss, counted);
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

    private sealed class Pass : IDisposable
    {
        public int Batch, Tokens, SeqLen;
        public IndexTensor Ids = null!, Positions = null!;
        public List<LayerActivations> Layers = new();
        public Tensor XFinal = null!, HFinal = null!, RstdFinal = null!, Logits = null!;

        public void Dispose()
        {
            foreach (var l in Layers) l.Dispose();
            foreach (var t in new IDisposable?[] { Ids, Positions, XFinal, HFinal, RstdFinal, Logits }) t?.Dispose();
        }
    }

    private Pass Forward(int[] tokens, int batch, bool keepActivations)
    {
        var c = Config;
        if (batch <= 0 || tokens.Length % batch != 0)
        {
            throw new ArgumentException($"{tokens.Length} tokens do not split into {batch} sequences of equal length");
        }

        int n = tokens.Length, t = n / batch, dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads;
        if (t > c.MaxPositionEmbeddings)
        {
            throw new ArgumentException($"sequence length {t} exceeds max_position_embeddings = {c.MaxPositionEmbeddings}");
        }

        var ops = Device.Ops;
        var pass = new Pass { Batch = batch, Tokens = n, SeqLen = t };
        try
        {
            pass.Ids = Device.FromIndices("input_ids", tokens);
            pass.Positions = Device.FromIndices("positions", Enumerable.Range(0, n).Select(i => i % t).ToArray());
            var x = Device.Zeros("x0", n, dm);
            ops.Embedding(pass.Ids, this["model.embed_tokens.weight"].Value, x);
            for (int i = 0; i < c.NumHiddenLayers; i++)
            {
                string p = $"model.layers.{i}.";
                var a = new LayerActivations { X = x };
                pass.Layers.Add(a);
                a.H = Device.Zeros("h", n, dm);
                a.Rstd1 = Device.Zeros("rstd1", n);
                ops.RmsNorm(x, this[p + "input_layernorm.weight"].Value, a.H, a.Rstd1, c.RmsNormEps);
                a.Q = Device.Zeros("q", batch, t, h, d);
                a.K = Device.Zeros("k", batch, t, hkv, d);
                a.V = Device.Zeros("v", batch, t, hkv, d);
                ops.Linear(a.H, this[p + "self_attn.q_proj.weight"].Value, Flat(a.Q, n));
                ops.Linear(a.H, this[p + "self_attn.k_proj.weight"].Value, Flat(a.K, n));
                ops.Linear(a.H, this[p + "self_attn.v_proj.weight"].Value, Flat(a.V, n));
                ops.Rope(a.Q, pass.Positions, a.Q, c.RopeTheta);
                ops.Rope(a.K, pass.Positions, a.K, c.RopeTheta);
                a.O = Device.Zeros("attn", batch, t, h, d);
                a.Lse = Device.Zeros("lse", batch, h, t);
                ops.Attention(a.Q, a.K, a.V, a.O, a.Lse, causal: true);
                a.X1 = Device.Zeros("x1", n, dm);
                ops.Linear(Flat(a.O, n), this[p + "self_attn.o_proj.weight"].Value, a.X1);
                ops.Add(a.X1, x, a.X1);
                a.H2 = Device.Zeros("h2", n, dm);
                a.Rstd2 = Device.Zeros("rstd2", n);
                ops.RmsNorm(a.X1, this[p + "post_attention_layernorm.weight"].Value, a.H2, a.Rstd2, c.RmsNormEps);
                a.Gate = Device.Zeros("gate", n, c.IntermediateSize);
                a.Up = Device.Zeros("up", n, c.IntermediateSize);
                a.Act = Device.Zeros("act", n, c.IntermediateSize);
                ops.Linear(a.H2, this[p + "mlp.gate_proj.weight"].Value, a.Gate);
                ops.Linear(a.H2, this[p + "mlp.up_proj.weight"].Value, a.Up);
                ops.SwiGlu(a.Gate, a.Up, a.Act);
                var x2 = Device.Zeros("x2", n, dm);
                ops.Linear(a.Act, this[p + "mlp.down_proj.weight"].Value, x2);
                ops.Add(x2, a.X1, x2);
                x = x2;
                if (!keepActivations)
                {
                    pass.Layers.Remove(a);
                    a.Dispose();
                }
            }

            pass.XFinal = x;
            pass.HFinal = Device.Zeros("h_final", n, dm);
            pass.RstdFinal = Device.Zeros("rstd_final", n);
            ops.RmsNorm(x, this["model.norm.weight"].Value, pass.HFinal, pass.RstdFinal, c.RmsNormEps);
            pass.Logits = Device.Zeros("logits", n, c.VocabSize);
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

    private void Backward(Pass pass, IndexTensor targets, int counted)
    {
        var c = Config;
        var ops = Device.Ops;
        int n = pass.Tokens, dm = c.HiddenSize;
        using var dLogits = Device.Zeros("dlogits", n, c.VocabSize);
        ops.CrossEntropyBackward(pass.Logits, targets, dLogits, 1f / counted);
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
            for (int i = c.NumHiddenLayers - 1; i >= 0; i--)
            {
                string p = $"model.layers.{i}.";
                var a = pass.Layers[i];
                // MLP: x2 = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1). dx holds dL/dx2.
                ops.LinearBackward(a.Act, this[p + "mlp.down_proj.weight"].Value, dx, dInter, GradOf(p + "mlp.down_proj.weight"), accumulateWeight: true);
                ops.SwiGluBackward(a.Gate, a.Up, dInter, dGate, dUp);
                ops.LinearBackward(a.H2, this[p + "mlp.gate_proj.weight"].Value, dGate, dTmp, GradOf(p + "mlp.gate_proj.weight"), accumulateWeight: true);
                using (var dh2 = Device.Zeros("dh2", n, dm))
                {
                    ops.Copy(dTmp, dh2);
                    ops.LinearBackward(a.H2, this[p + "mlp.up_proj.weight"].Value, dUp, dTmp, GradOf(p + "mlp.up_proj.weight"), accumulateWeight: true);
                    ops.Add(dh2, dTmp, dh2);
                    AddNormBackward(dh2, a.X1, p + "post_attention_layernorm.weight", a.Rstd2, dx, accumulateInput: true); // dx = dL/dx1
                }

                // Attention: x1 = x + o_proj(attn(rope(q(h)), rope(k(h)), v(h))), h = norm(x).
                using var dO = Device.Zeros("dattn", a.O.Shape.ToArray());
                ops.LinearBackward(Flat(a.O, n), this[p + "self_attn.o_proj.weight"].Value, dx, Flat(dO, n), GradOf(p + "self_attn.o_proj.weight"), accumulateWeight: true);
                using var dq = Device.Zeros("dq", a.Q.Shape.ToArray());
                using var dk = Device.Zeros("dk", a.K.Shape.ToArray());
                using var dv = Device.Zeros("dv", a.V.Shape.ToArray());
                ops.AttentionBackward(a.Q, a.K, a.V, a.O, a.Lse, dO, dq, dk, dv, causal: true);
                ops.Rope(dq, pass.Positions, dq, c.RopeTheta, inverse: true);
                ops.Rope(dk, pass.Positions, dk, c.RopeTheta, inverse: true);
                using var dhAttn = Device.Zeros("dh", n, dm);
                ops.LinearBackward(a.H, this[p + "self_attn.q_proj.weight"].Value, Flat(dq, n), dhAttn, GradOf(p + "self_attn.q_proj.weight"), accumulateWeight: true);
                ops.LinearBackward(a.H, this[p + "self_attn.k_proj.weight"].Value, Flat(dk, n), dTmp, GradOf(p + "self_attn.k_proj.weight"), accumulateWeight: true);
                ops.Add(dhAttn, dTmp, dhAttn);
                ops.LinearBackward(a.H, this[p + "self_attn.v_proj.weight"].Value, Flat(dv, n), dTmp, GradOf(p + "self_attn.v_proj.weight"), accumulateWeight: true);
                ops.Add(dhAttn, dTmp, dhAttn);
                AddNormBackward(dhAttn, a.X, p + "input_layernorm.weight", a.Rstd1, dx, accumulateInput: true); // dx = dL/dx
            }

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
    public float[] DecodeStep(KvCache cache, int[] newTokens)
    {
        var c = Config;
        int tn = newTokens.Length, start = cache.Length, total = start + tn;
        if (tn == 0) throw new ArgumentException("DecodeStep needs at least one token");
        if (total > cache.Capacity) throw new ArgumentException($"KV cache holds {cache.Capacity} positions; {start} used + {tn} new do not fit");
        int dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads;
        var ops = Device.Ops;
        using var ids = Device.FromIndices("input_ids", newTokens);
        using var pos = Device.FromIndices("positions", Enumerable.Range(start, tn).ToArray());
        var x = Device.Zeros("x", tn, dm);
        using var hbuf = Device.Zeros("h", tn, dm);
        using var rstd = Device.Zeros("rstd", tn);
        using var q = Device.Zeros("q", 1, tn, h, d);
        using var o = Device.Zeros("attn", 1, tn, h, d);
        using var lse = Device.Zeros("lse", 1, h, tn);
        using var tmp = Device.Zeros("tmp", tn, dm);
        using var gate = Device.Zeros("gate", tn, c.IntermediateSize);
        using var up = Device.Zeros("up", tn, c.IntermediateSize);
        try
        {
            ops.Embedding(ids, this["model.embed_tokens.weight"].Value, x);
            for (int i = 0; i < c.NumHiddenLayers; i++)
            {
                string p = $"model.layers.{i}.";
                ops.RmsNorm(x, this[p + "input_layernorm.weight"].Value, hbuf, rstd, c.RmsNormEps);
                ops.Linear(hbuf, this[p + "self_attn.q_proj.weight"].Value, Flat(q, tn));
                var kNew = cache.Keys[i].View(start * hkv * d, 1, tn, hkv, d);
                var vNew = cache.Values[i].View(start * hkv * d, 1, tn, hkv, d);
                ops.Linear(hbuf, this[p + "self_attn.k_proj.weight"].Value, Flat(kNew, tn));
                ops.Linear(hbuf, this[p + "self_attn.v_proj.weight"].Value, Flat(vNew, tn));
                ops.Rope(q, pos, q, c.RopeTheta);
                ops.Rope(kNew, pos, kNew, c.RopeTheta);
                ops.Attention(q, cache.Keys[i].View(0, 1, total, hkv, d), cache.Values[i].View(0, 1, total, hkv, d), o, lse, causal: true);
                ops.Linear(Flat(o, tn), this[p + "self_attn.o_proj.weight"].Value, tmp);
                ops.Add(x, tmp, x);
                ops.RmsNorm(x, this[p + "post_attention_layernorm.weight"].Value, hbuf, rstd, c.RmsNormEps);
                ops.Linear(hbuf, this[p + "mlp.gate_proj.weight"].Value, gate);
                ops.Linear(hbuf, this[p + "mlp.up_proj.weight"].Value, up);
                ops.SwiGlu(gate, up, gate);
                ops.Linear(gate, this[p + "mlp.down_proj.weight"].Value, tmp);
                ops.Add(x, tmp, x);
            }

            cache.Length = total;
            var last = x.View((tn - 1) * dm, 1, dm);
            using var hl = Device.Zeros("h_last", 1, dm);
            using var rl = Device.Zeros("rstd_last", 1);
            ops.RmsNorm(last, this["model.norm.weight"].Value, hl, rl, c.RmsNormEps);
            using var logits = Device.Zeros("logits", 1, c.VocabSize);
            ops.Linear(hl, LmHead, logits);
            return logits.ToArray();
        }
        finally
        {
            x.Dispose();
        }
    }

    public void ZeroGrad()
    {
        foreach (var p in parameters) p.ZeroGrad();
    }

    public void Dispose()
    {
        foreach (var p in parameters) p.Dispose();
        parameters.Clear();
        byName.Clear();
    }
}
