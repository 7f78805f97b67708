using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// One Llama decoder block, the only one every path runs (training, full-sequence inference, prefill and decode):
/// x1 = x + o_proj(attn(rope(q(h)), rope(k(h)), v(h))), h = norm(x); x2 = x1 + down(swiglu(gate(h2), up(h2))),
/// h2 = norm(x1). What differs between paths is what the <see cref="LayerPass"/> says: how rows attend (its
/// <see cref="AttentionLayout"/>: a batch, grouped completions, KV caches with shared-prefix runs), what each linear adds
/// (<see cref="LinearPass"/>) and whether activations are kept for <see cref="Backward"/>.
/// Shapes: N rows, Dm hidden, H/Hkv heads, D head dim, I intermediate.
/// </summary>
internal sealed class DecoderLayer
{
    private readonly LlamaConfig config;

    public DecoderLayer(int index, LlamaConfig config, Func<string, Parameter> weight, Func<string, Linear> linear)
    {
        Index = index;
        this.config = config;
        string p = $"model.layers.{index}.";
        InputNorm = weight(p + "input_layernorm.weight");
        PostNorm = weight(p + "post_attention_layernorm.weight");
        Q = linear(p + "self_attn.q_proj");
        K = linear(p + "self_attn.k_proj");
        V = linear(p + "self_attn.v_proj");
        O = linear(p + "self_attn.o_proj");
        Gate = linear(p + "mlp.gate_proj");
        Up = linear(p + "mlp.up_proj");
        Down = linear(p + "mlp.down_proj");
        if (config.QkNorm)
        {
            QNorm = weight(p + "self_attn.q_norm.weight");
            KNorm = weight(p + "self_attn.k_norm.weight");
        }
    }

    public int Index { get; }
    public Parameter InputNorm { get; }
    public Parameter PostNorm { get; }
    public Linear Q { get; }
    public Linear K { get; }
    public Linear V { get; }
    public Linear O { get; }
    public Linear Gate { get; }
    public Linear Up { get; }
    public Linear Down { get; }

    /// <summary>Qwen3's per-head RMSNorm weights (D) of queries and keys, or null.</summary>
    public Parameter? QNorm { get; }
    public Parameter? KNorm { get; }

    /// <summary>
    /// Runs the block on the residual stream <paramref name="x"/> (N, Dm) and returns the stream after it: x itself
    /// when both residual sums were added in place (inference through plain o_proj and down_proj), else a new tensor.
    /// <paramref name="a"/> receives what was computed (the caller owns and disposes it, even when this throws; its X is
    /// the input stream when that was not updated in place).
    /// </summary>
    public Tensor Forward(Tensor x, LayerPass pass, LayerActivations a)
    {
        var c = config;
        var device = x.Device;
        var ops = device.Ops;
        var lp = pass.Linears;
        int n = x.Dim(0), dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads;
        // Inference through plain o_proj and down_proj adds both products into the residual stream in place
        // (beta = 1): no layer keeps its input, so neither the two residual adds nor their outputs are needed.
        bool inPlace = !pass.KeepActivations && O.IsPlain(lp) && Down.IsPlain(lp);
        a.X = inPlace ? null! : x;
        a.H = device.Empty("h", n, dm);
        a.Rstd1 = device.Zeros("rstd1", n);
        NormWithVariants(x, InputNorm, a.H, a.Rstd1, lp.Variants, c.RmsNormEps);
        a.Q = device.Empty("q", 1, n, h, d);
        a.K = device.Empty("k", 1, n, hkv, d);
        a.V = device.Empty("v", 1, n, hkv, d);
        Q.Forward(a.H, Flat(a.Q, n), lp);
        K.Forward(a.H, Flat(a.K, n), lp);
        V.Forward(a.H, Flat(a.V, n), lp);
        if (QNorm != null && KNorm != null)
        {
            // Qwen3: each head's query and key normalised over D before RoPE; the projections' outputs stay for the backward.
            a.QRaw = a.Q;
            a.Q = device.Empty("q_normed", 1, n, h, d);
            a.QRstd = device.Zeros("q_rstd", n * h);
            HeadNorm(a.QRaw, QNorm, a.Q, a.QRstd, lp.Variants);
            a.KRaw = a.K;
            a.K = device.Empty("k_normed", 1, n, hkv, d);
            a.KRstd = device.Zeros("k_rstd", n * hkv);
            HeadNorm(a.KRaw, KNorm, a.K, a.KRstd, lp.Variants);
        }

        ops.Rope(a.Q, pass.Positions, a.Q, c.RopeTheta, scaling: c.RopeScaling);
        ops.Rope(a.K, pass.Positions, a.K, c.RopeTheta, scaling: c.RopeScaling);
        a.O = device.Zeros("attn", 1, n, h, d);
        a.Lse = device.Zeros("lse", 1, n, h);
        pass.Layout.Forward(ops, Index, a.Q, a.K, a.V, a.O, a.Lse);
        Tensor x1;
        if (inPlace)
        {
            ops.MatMul(Flat(a.O, n), O.Weight.Value, x, transposeB: true, beta: 1f);
            x1 = x;
        }
        else
        {
            x1 = a.X1 = device.Empty("x1", n, dm);
            O.Forward(Flat(a.O, n), a.X1, lp);
            ops.Add(a.X1, x, a.X1);
        }

        a.H2 = device.Empty("h2", n, dm);
        a.Rstd2 = device.Zeros("rstd2", n);
        NormWithVariants(x1, PostNorm, a.H2, a.Rstd2, lp.Variants, c.RmsNormEps);
        a.Act = device.Empty("act", n, c.IntermediateSize);
        if (!pass.KeepActivations && Gate.IsPlain(lp) && Up.IsPlain(lp))
        {
            // Inference through base weights only: gate and up are never needed apart, so they are not stored.
            ops.LinearSwiGlu(a.H2, Gate.Weight.Value, Up.Weight.Value, a.Act);
        }
        else
        {
            a.Gate = device.Empty("gate", n, c.IntermediateSize);
            a.Up = device.Empty("up", n, c.IntermediateSize);
            Gate.Forward(a.H2, a.Gate, lp);
            Up.Forward(a.H2, a.Up, lp);
            ops.SwiGlu(a.Gate, a.Up, a.Act);
        }

        if (inPlace)
        {
            ops.MatMul(a.Act, Down.Weight.Value, x, transposeB: true, beta: 1f);
            return x;
        }

        var x2 = device.Empty("x2", n, dm);
        try
        {
            Down.Forward(a.Act, x2, lp);
            ops.Add(x2, a.X1!, x2);
        }
        catch
        {
            x2.Dispose();
            throw;
        }

        return x2;
    }

    /// <summary>
    /// Backpropagates through the block: <paramref name="dx"/> holds dL/dx2 on entry and dL/dx on return; weight
    /// gradients are added where parameters train. <paramref name="scratch"/> holds buffers shared by every layer.
    /// </summary>
    public void Backward(LayerActivations a, Tensor dx, LayerPass pass, BackwardScratch scratch)
    {
        var c = config;
        var device = dx.Device;
        var ops = device.Ops;
        var lp = pass.Linears;
        int n = dx.Dim(0);
        // MLP: x2 = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1). dx holds dL/dx2.
        Down.Backward(a.Act, dx, scratch.DInter, lp);
        ops.SwiGluBackward(a.Gate!, a.Up!, scratch.DInter, scratch.DGate, scratch.DUp);
        Gate.Backward(a.H2, scratch.DGate, scratch.DH2, lp);
        Up.Backward(a.H2, scratch.DUp, scratch.DTmp, lp);
        ops.Add(scratch.DH2, scratch.DTmp, scratch.DH2);
        AddNormBackward(scratch.DH2, a.X1!, PostNorm, a.Rstd2, dx, accumulateInput: true); // dx = dL/dx1

        // Attention: x1 = x + o_proj(attn(rope(q(h)), rope(k(h)), v(h))), h = norm(x).
        using var dO = device.Zeros("dattn", a.O.Shape.ToArray());
        O.Backward(Flat(a.O, n), dx, Flat(dO, n), lp);
        using var dq = device.Zeros("dq", a.Q.Shape.ToArray());
        using var dk = device.Zeros("dk", a.K.Shape.ToArray());
        using var dv = device.Zeros("dv", a.V.Shape.ToArray());
        pass.Layout.Backward(ops, Index, a.Q, a.K, a.V, a.O, a.Lse, dO, dq, dk, dv);
        ops.Rope(dq, pass.Positions, dq, c.RopeTheta, inverse: true, scaling: c.RopeScaling);
        ops.Rope(dk, pass.Positions, dk, c.RopeTheta, inverse: true, scaling: c.RopeScaling);
        if (QNorm != null && KNorm != null)
        {
            // dq, dk are the gradients of the normalised heads; through each head's RMSNorm to the projections' outputs.
            AddNormBackward(HeadRows(dq), HeadRows(a.QRaw!), QNorm, a.QRstd!, HeadRows(dq), accumulateInput: false);
            AddNormBackward(HeadRows(dk), HeadRows(a.KRaw!), KNorm, a.KRstd!, HeadRows(dk), accumulateInput: false);
        }

        Q.Backward(a.H, Flat(dq, n), scratch.DHAttn, lp);
        K.Backward(a.H, Flat(dk, n), scratch.DTmp, lp);
        ops.Add(scratch.DHAttn, scratch.DTmp, scratch.DHAttn);
        V.Backward(a.H, Flat(dv, n), scratch.DTmp, lp);
        ops.Add(scratch.DHAttn, scratch.DTmp, scratch.DHAttn);
        AddNormBackward(scratch.DHAttn, a.X, InputNorm, a.Rstd1, dx, accumulateInput: true); // dx = dL/dx
    }

    /// <summary>
    /// RMSNorm of x (R, D) into h, rstd (R), with each row's variant's weight where it brings its own.
    /// <paramref name="batchRows"/> gives the batch row (whose variant applies) of each row of x; by default row i is
    /// batch row i.
    /// </summary>
    internal static void NormWithVariants(Tensor x, Parameter weight, Tensor h, Tensor rstd, IRowVariants? variants, float eps, IEnumerable<int>? batchRows = null)
    {
        var ops = x.Device.Ops;
        int n = x.Dim(0), dm = x.Dim(1);
        ops.RmsNorm(x, weight.Value, h, rstd, eps);
        foreach (var (r0, rows, w) in VariantRuns.Replacements(variants, weight.Name, batchRows ?? Enumerable.Range(0, n)))
        {
            ops.RmsNorm(x.View(r0 * dm, rows, dm), w, h.View(r0 * dm, rows, dm), rstd.View(r0, rows), eps);
        }
    }

    /// <summary>
    /// RMSNorm of every head of x (1, N, heads, D) over D into y, rstd (N * heads), with each row's variant's weight
    /// where it brings its own (a full fine-tune's 1-bit delta keeps q_norm / k_norm densely).
    /// </summary>
    private void HeadNorm(Tensor x, Parameter weight, Tensor y, Tensor rstd, IRowVariants? variants)
    {
        int heads = x.Dim(2);
        NormWithVariants(HeadRows(x), weight, HeadRows(y), rstd, variants, config.RmsNormEps, variants == null ? null : Enumerable.Range(0, x.Length / x.Dim(3)).Select(r => r / heads));
    }

    /// <summary>(1, N, heads, D) as (N * heads, D): one row per head.</summary>
    private static Tensor HeadRows(Tensor t) => t.Reshape(t.Length / t.Dim(3), t.Dim(3));

    /// <summary>RMSNorm backward: dx (+)= d/dx, and the weight's gradient accumulated into its Grad.</summary>
    internal static void AddNormBackward(Tensor dy, Tensor x, Parameter w, Tensor rstd, Tensor dx, bool accumulateInput)
    {
        var device = dy.Device;
        var ops = device.Ops;
        using var dxPart = device.Zeros("dx_norm", x.Shape.ToArray());
        using var dw = device.Zeros("dw_norm", w.Value.Shape.ToArray());
        ops.RmsNormBackward(dy, x, w.Value, rstd, dxPart, dw);
        if (w.Trainable) ops.Axpy(1f, dw, w.Grad);
        if (accumulateInput) ops.Add(dx, dxPart, dx);
        else ops.Copy(dxPart, dx);
    }

    /// <summary>A (rows, last two dims merged) view: (B, T, H, D) as (N, H * D).</summary>
    internal static Tensor Flat(Tensor t, int rows) => t.Reshape(rows, t.Length / rows);
}

/// <summary>What every layer of one pass shares: how rows attend, their rotary positions, what the linears add, and whether the backward will run.</summary>
internal sealed class LayerPass
{
    public LayerPass(AttentionLayout layout, IndexTensor positions, LinearPass linears, bool keepActivations)
    {
        Layout = layout;
        Positions = positions;
        Linears = linears;
        KeepActivations = keepActivations;
    }

    public AttentionLayout Layout { get; }

    /// <summary>Rotary position of each row (N).</summary>
    public IndexTensor Positions { get; }

    public LinearPass Linears { get; }

    /// <summary>Training: every layer's activations stay for the backward, and no sum is taken in place.</summary>
    public bool KeepActivations { get; }
}

/// <summary>What a layer's forward computed, kept for its backward. X is the layer's input stream.</summary>
internal sealed class LayerActivations : IDisposable
{
    public Tensor X = null!, H = null!, Rstd1 = null!, Q = null!, K = null!, V = null!, O = null!, Lse = null!;
    public Tensor? X1, Gate, Up;
    public Tensor? QRaw, KRaw, QRstd, KRstd; // Qwen3's q/k norms: the projections' outputs and the heads' 1 / rms
    public Tensor H2 = null!, Rstd2 = null!, Act = null!;

    public void Dispose()
    {
        foreach (var t in new[] { X, H, Rstd1, Q, K, V, O, Lse, X1, H2, Rstd2, Gate, Up, Act, QRaw, KRaw, QRstd, KRstd }) t?.Dispose();
    }
}

/// <summary>Gradient buffers every layer's backward reuses: (N, Dm) and (N, I).</summary>
internal sealed class BackwardScratch : IDisposable
{
    public BackwardScratch(Device device, int rows, int hidden, int intermediate)
    {
        DTmp = device.Zeros("dtmp", rows, hidden);
        DInter = device.Zeros("dinter", rows, intermediate);
        DGate = device.Zeros("dgate", rows, intermediate);
        DUp = device.Zeros("dup", rows, intermediate);
        DH2 = device.Zeros("dh2", rows, hidden);
        DHAttn = device.Zeros("dh", rows, hidden);
    }

    public Tensor DTmp { get; }
    public Tensor DInter { get; }
    public Tensor DGate { get; }
    public Tensor DUp { get; }
    public Tensor DH2 { get; }
    public Tensor DHAttn { get; }

    public void Dispose()
    {
        foreach (var t in new[] { DTmp, DInter, DGate, DUp, DH2, DHAttn }) t.Dispose();
    }
}
