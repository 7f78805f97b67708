using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Optim;

namespace PeftSharp.Engine;

/// <summary>
/// The op surface every backend serves. Each method checks devices, disposal and shapes, naming the tensors and
/// shapes in its error, then runs the device's implementation. Outputs are overwritten unless stated otherwise;
/// callers accumulate gradients with <see cref="Axpy"/> or a matmul's beta. Inputs are never disposed.
/// Shape letters: B batch, T tokens, H heads, Hkv key/value heads, D head dim, M/N/K matmul, V vocabulary.
/// </summary>
public sealed partial class Ops
{
    private readonly Device device;

    internal Ops(Device device) => this.device = device;

    /// <summary>
    /// c = alpha * op(a) op(b) + beta * c, where op transposes the last two dims when asked.
    /// Shapes: a (M, K) [or (K, M)], b (K, N) [or (N, K)], c (M, N). Batched: a (Bt, M, K), b (Bt, K, N) or (K, N)
    /// shared, c (Bt, M, N). A rank-3+ untransposed a with a rank-2 b folds its leading dims into M (a linear layer
    /// over (B, T, K) activations). With beta = 0, c is not read.
    /// </summary>
    public void MatMul(Tensor a, Tensor b, Tensor c, bool transposeA = false, bool transposeB = false, float alpha = 1f, float beta = 0f)
    {
        Check("matmul", a, b, c);
        if (ReferenceEquals(c.Storage, a.Storage) || ReferenceEquals(c.Storage, b.Storage))
        {
            throw new ArgumentException($"matmul: output {c} shares storage with an input; use a separate tensor");
        }

        int batch;
        int m, k, kb, n;
        bool broadcastB;
        if (a.Rank >= 3 && b.Rank == 2 && !transposeA)
        {
            batch = 1;
            m = a.Length / a.Dim(-1);
            k = a.Dim(-1);
            broadcastB = true;
        }
        else if (a.Rank == 3 && (b.Rank == 3 || b.Rank == 2))
        {
            batch = a.Dim(0);
            (m, k) = transposeA ? (a.Dim(2), a.Dim(1)) : (a.Dim(1), a.Dim(2));
            broadcastB = b.Rank == 2;
            if (!broadcastB && b.Dim(0) != batch)
            {
                throw new ArgumentException($"matmul: batch of a {a} is {batch} but b {b} has batch {b.Dim(0)}");
            }
        }
        else if (a.Rank == 2 && b.Rank == 2)
        {
            batch = 1;
            (m, k) = transposeA ? (a.Dim(1), a.Dim(0)) : (a.Dim(0), a.Dim(1));
            broadcastB = true;
        }
        else
        {
            throw new ArgumentException($"matmul: unsupported ranks: a {a}, b {b} (want rank 2 or 3; b of rank 2 or matching a's batch)");
        }

        (kb, n) = transposeB ? (b.Dim(-1), b.Dim(-2)) : (b.Dim(-2), b.Dim(-1));
        if (k != kb)
        {
            throw new ArgumentException(
                $"matmul: inner dimensions differ: a {a}{(transposeA ? " (transposed)" : "")} gives K = {k}, b {b}{(transposeB ? " (transposed)" : "")} gives K = {kb}");
        }

        if (c.Length != batch * m * n || c.Dim(-1) != n)
        {
            throw new ArgumentException($"matmul: output c {c} should hold ({(batch > 1 ? batch + ", " : "")}{m}, {n}) for a {a} and b {b}");
        }

        device.MatMulCore(a, b, c, new MatMulShape(batch, m, n, k, transposeA, transposeB, broadcastB), alpha, beta);
    }

    /// <summary>Linear layer without bias: y = x w^T. x (..., K), w (N, K) as stored by Hugging Face, y (..., N).</summary>
    public void Linear(Tensor x, Tensor w, Tensor y) => MatMul(x, w, y, transposeB: true);

    /// <summary>
    /// Backward of <see cref="Linear"/>: dx = dy w (when dx is given) and dw (+)= dy^T x (accumulated when
    /// <paramref name="accumulateWeight"/>). x (..., K), w (N, K), dy (..., N).
    /// </summary>
    public void LinearBackward(Tensor x, Tensor w, Tensor dy, Tensor? dx, Tensor? dw, bool accumulateWeight = false)
    {
        if (dx != null) MatMul(dy, w, dx);
        if (dw != null)
        {
            int rows = x.Length / x.Dim(-1);
            using var x2 = x.Reshape(rows, x.Dim(-1));
            using var dy2 = dy.Reshape(dy.Length / dy.Dim(-1), dy.Dim(-1));
            MatMul(dy2, x2, dw, transposeA: true, beta: accumulateWeight ? 1f : 0f);
        }
    }

    /// <summary>
    /// Mixed-adapter LoRA delta: y_i += s_a (x_i A_a^T) B_a^T for each row i whose adapter a = rowAdapters[i] is not -1.
    /// x (M, K) and y (M, N) are the linear layer's input and output (add the base product x W^T separately, once for
    /// the whole batch); B A is never formed. Adapters of any ranks share one launch.
    /// </summary>
    public void LoraMixed(Tensor x, Tensor y, LoraAdapterPool pool, IndexTensor rowAdapters)
    {
        int rows = CheckMixed("lora", "adapter", x, y, pool.Device, pool.InFeatures, pool.OutFeatures, pool.Count, rowAdapters);

        if (pool.Count > 0 && rows > 0) device.LoraMixedCore(x, y, pool, rowAdapters, new LoraBatchShape(rows, pool.InFeatures, pool.OutFeatures, pool.MaxRank));
    }

    /// <summary>
    /// DoRA rows of a mixed batch: y[i, :] *= scales[slot[i], :] (each DoRA adapter's m / ||W + s B A||_row) for rows
    /// whose slot is not -1, after the batch's LoRA delta was added. y (M, N), scales (slots, N).
    /// </summary>
    public void DoraScale(Tensor y, Tensor scales, IndexTensor rowSlots)
    {
        Check("dora scale", y, scales);
        CheckIndex("dora scale", rowSlots);
        if (y.Rank != 2 || scales.Rank != 2 || scales.Dim(1) != y.Dim(1)) throw new ArgumentException($"dora scale: y {y} must be (M, N) and scales {scales} (slots, N)");
        if (rowSlots.Length != y.Dim(0)) throw new ArgumentException($"dora scale: row slots {rowSlots} must name one slot (or -1) per row of y {y}");
        foreach (int slot in rowSlots.Host)
        {
            if (slot < -1 || slot >= scales.Dim(0)) throw new ArgumentException($"dora scale: slot {slot} in {rowSlots} is outside [-1, {scales.Dim(0)})");
        }

        if (y.Length > 0) device.DoraScaleCore(y, scales, rowSlots, y.Dim(1));
    }

    /// <summary>
    /// Backward of <see cref="LoraMixed"/> with the base frozen, many adapters trained in one batch: for each row of
    /// adapter a, dB_a += s_a dy^T (x A_a^T), dA_a += (s_a dy B_a)^T x, and dx += (s_a dy B_a) A_a. da and db have the
    /// pool's layout (every adapter's A, then every B, concatenated) and are accumulated into, as is dx when given.
    /// </summary>
    public void LoraMixedBackward(Tensor x, Tensor dy, LoraAdapterPool pool, IndexTensor rowAdapters, Tensor? dx, Tensor da, Tensor db)
    {
        int rows = CheckMixed("lora backward", "adapter", x, dy, pool.Device, pool.InFeatures, pool.OutFeatures, pool.Count, rowAdapters);
        Check("lora backward", da, db);
        Expect("lora backward", da, pool.APool.Length, $"the A pool's {pool.APool.Length} values");
        Expect("lora backward", db, pool.BPool.Length, $"the B pool's {pool.BPool.Length} values");
        if (dx != null) SameShape("lora backward", x, dx);
        if (pool.Count > 0 && rows > 0) device.LoraMixedBackwardCore(x, dy, pool, rowAdapters, dx, da, db, new LoraBatchShape(rows, pool.InFeatures, pool.OutFeatures, pool.MaxRank));
    }

    /// <summary>
    /// y (M, N) += each row's 1-bit delta: for row i with variant v = rowVariants[i] (-1: none), sum over v's rounds of
    /// scale_j * x_i S_j^T, straight from the packed sign words (no dense delta). Run after the shared base product.
    /// </summary>
    public void BitDeltaMixed(Tensor x, Tensor y, BitDeltaPool pool, IndexTensor rowVariants)
    {
        int rows = CheckMixed("1-bit", "variant", x, y, pool.Device, pool.InFeatures, pool.OutFeatures, pool.Count, rowVariants);

        if (pool.Count > 0 && rows > 0 && pool.OutFeatures > 0) device.BitDeltaMixedCore(x, y, pool, rowVariants, new BitDeltaShape(rows, pool.InFeatures, pool.OutFeatures));
    }

    /// <summary>
    /// dense (N, K) = (accumulate ? dense : 0) + factor * sum over variant <paramref name="variant"/>'s rounds of
    /// scale_j S_j: the decoded delta, or (accumulate, factor +1 / -1) merging it into a weight and taking it out again.
    /// <paramref name="scales"/>, when given, replaces the pool's scales (one per round), as scale distillation needs.
    /// </summary>
    public void BitDeltaDecode(BitDeltaPool pool, int variant, Tensor dense, bool accumulate = false, float factor = 1f, IReadOnlyList<float>? scales = null)
    {
        Check("1-bit decode", dense);
        if (!ReferenceEquals(pool.Device, device)) throw new ArgumentException($"1-bit decode: the delta pool lives on {pool.Device.Info.Spec}, not on {device.Info.Spec}");
        if (variant < 0 || variant >= pool.Count) throw new ArgumentException($"1-bit decode: variant {variant} is outside [0, {pool.Count})");
        Expect("1-bit decode", dense, pool.OutFeatures * pool.InFeatures, $"(N = {pool.OutFeatures}, K = {pool.InFeatures})");
        var s = new BitDeltaShape(pool.OutFeatures, pool.InFeatures, pool.OutFeatures);
        if (dense.Length == 0) return;
        if (scales != null && scales.Count != pool.RoundsHost[variant]) throw new ArgumentException($"1-bit decode: {scales.Count} scales given for {pool.RoundsHost[variant]} rounds");
        for (int j = 0; j < pool.RoundsHost[variant]; j++)
        {
            int slot = pool.FirstHost[variant] + j;
            device.BitDeltaDecodeCore(pool, slot, dense, factor * (scales?[j] ?? pool.ScalesHost[slot]), accumulate || j > 0 ? 1f : 0f, s);
        }
    }

    /// <summary>y = a + b (same shape; y may alias an input).</summary>
    public void Add(Tensor a, Tensor b, Tensor y)
    {
        SameShape("add", a, b, y);
        device.AddCore(a, b, y);
    }

    /// <summary>y = a * b elementwise.</summary>
    public void Mul(Tensor a, Tensor b, Tensor y)
    {
        SameShape("mul", a, b, y);
        device.MulCore(a, b, y);
    }

    /// <summary>y = s * x.</summary>
    public void Scale(Tensor x, float s, Tensor y)
    {
        SameShape("scale", x, y);
        device.ScaleCore(x, s, y);
    }

    /// <summary>y[r, j] = x[r, j] * c[j]: scales each column of x (rows, cols) by c (cols); y may alias x.</summary>
    public void ScaleColumns(Tensor x, Tensor c, Tensor y)
    {
        SameShape("scale columns", x, y);
        Check("scale columns", c);
        int cols = c.Length;
        if (cols == 0 || x.Dim(-1) != cols) throw new ArgumentException($"scale columns: x {x} has {x.Dim(-1)} columns, c {c} has {cols} values");
        if (x.Length > 0) device.ScaleColumnsCore(x, c, y, cols);
    }

    /// <summary>y += alpha * x (gradient accumulation).</summary>
    public void Axpy(float alpha, Tensor x, Tensor y)
    {
        SameShape("axpy", x, y);
        device.AxpyCore(alpha, x, y);
    }

    public void Fill(Tensor y, float value)
    {
        Check("fill", y);
        device.FillCore(y, value);
    }

    public void Copy(Tensor source, Tensor destination)
    {
        SameShape("copy", source, destination);
        device.CopyCore(source, destination);
    }

    /// <summary>y = x * sigmoid(x).</summary>
    /// <summary>y = tanh(x); y may alias x.</summary>
    public void Tanh(Tensor x, Tensor y)
    {
        SameShape("tanh", x, y);
        if (x.Length > 0) device.TanhCore(x, y);
    }

    /// <summary>dx = dy * (1 - y^2), y the forward's output.</summary>
    public void TanhBackward(Tensor y, Tensor dy, Tensor dx)
    {
        SameShape("tanh backward", y, dy, dx);
        if (y.Length > 0) device.TanhBackwardCore(y, dy, dx);
    }

    public void Silu(Tensor x, Tensor y)
    {
        SameShape("silu", x, y);
        device.SiluCore(x, y);
    }

    public void SiluBackward(Tensor x, Tensor dy, Tensor dx)
    {
        SameShape("silu backward", x, dy, dx);
        device.SiluBackwardCore(x, dy, dx);
    }

    /// <summary>y = silu(gate) * up: the Llama MLP's gate.</summary>
    public void SwiGlu(Tensor gate, Tensor up, Tensor y)
    {
        SameShape("swiglu", gate, up, y);
        device.SwiGluCore(gate, up, y);
    }

    /// <summary>
    /// y = silu(x wGate^T) * (x wUp^T): the Llama MLP's gate and up projections and their SwiGLU as one op, for
    /// inference (the two products are not kept for a backward). x (..., K), wGate and wUp (N, K) as Hugging Face stores
    /// them, y (..., N). The CPU backend computes both products of each output tile together and applies the SwiGLU
    /// before storing it; other backends, and shapes the CPU's fused path does not take, run Linear twice and SwiGlu.
    /// </summary>
    public void LinearSwiGlu(Tensor x, Tensor wGate, Tensor wUp, Tensor y)
    {
        Check("linear swiglu", x, wGate, wUp, y);
        if (wGate.Rank != 2 || wUp.Rank != 2 || wGate.Dim(0) != wUp.Dim(0) || wGate.Dim(1) != wUp.Dim(1))
        {
            throw new ArgumentException($"linear swiglu: gate weight {wGate} and up weight {wUp} must both be (N, K) of one shape");
        }

        int n = wGate.Dim(0), k = wGate.Dim(1);
        if (x.Rank < 2 || x.Dim(-1) != k)
        {
            throw new ArgumentException($"linear swiglu: input {x} must be (..., {k}) for weights of shape ({n}, {k})");
        }

        int m = x.Length / k;
        if (y.Length != (long)m * n || y.Dim(-1) != n)
        {
            throw new ArgumentException($"linear swiglu: output {y} should hold ({m}, {n}) for input {x} and weights ({n}, {k})");
        }

        if (ReferenceEquals(y.Storage, x.Storage) || ReferenceEquals(y.Storage, wGate.Storage) || ReferenceEquals(y.Storage, wUp.Storage))
        {
            throw new ArgumentException($"linear swiglu: output {y} shares storage with an input; use a separate tensor");
        }

        device.LinearSwiGluCore(x, wGate, wUp, y, m, n, k);
    }

    public void SwiGluBackward(Tensor gate, Tensor up, Tensor dy, Tensor dGate, Tensor dUp)
    {
        SameShape("swiglu backward", gate, up, dy, dGate, dUp);
        device.SwiGluBackwardCore(gate, up, dy, dGate, dUp);
    }

    /// <summary>Softmax over the last dimension.</summary>
    public void Softmax(Tensor x, Tensor y)
    {
        SameShape("softmax", x, y);
        int cols = x.Rank == 0 ? 1 : x.Dim(-1);
        device.SoftmaxCore(x, y, cols == 0 ? 0 : x.Length / cols, cols);
    }

    /// <summary>dx = y * (dy - sum(dy * y)) over the last dimension, from the forward's output y.</summary>
    public void SoftmaxBackward(Tensor y, Tensor dy, Tensor dx)
    {
        SameShape("softmax backward", y, dy, dx);
        int cols = y.Dim(-1);
        device.SoftmaxBackwardCore(y, dy, dx, cols == 0 ? 0 : y.Length / cols, cols);
    }

    /// <summary>
    /// RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * w. x, y (..., D); w (D); rstd (rows) receives
    /// rsqrt(mean(x^2) + eps) for the backward pass.
    /// </summary>
    public void RmsNorm(Tensor x, Tensor w, Tensor y, Tensor rstd, float eps)
    {
        SameShape("rmsnorm", x, y);
        Check("rmsnorm", w, rstd);
        int dim = x.Dim(-1);
        int rows = x.Length / Math.Max(dim, 1);
        Expect("rmsnorm", w, dim, $"weight of length D = {dim} for x {x}");
        Expect("rmsnorm", rstd, rows, $"one value per row ({rows}) of x {x}");
        device.RmsNormCore(x, w, y, rstd, rows, dim, eps);
    }

    /// <summary>Backward of <see cref="RmsNorm"/>: dx (..., D) and dw (D), both overwritten.</summary>
    public void RmsNormBackward(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor dx, Tensor dw)
    {
        SameShape("rmsnorm backward", dy, x, dx);
        Check("rmsnorm backward", w, rstd, dw);
        int dim = x.Dim(-1);
        int rows = x.Length / Math.Max(dim, 1);
        Expect("rmsnorm backward", w, dim, $"length D = {dim}");
        Expect("rmsnorm backward", dw, dim, $"length D = {dim}");
        Expect("rmsnorm backward", rstd, rows, $"one value per row ({rows})");
        device.RmsNormBackwardCore(dy, x, w, rstd, dx, dw, rows, dim);
    }

    /// <summary>
    /// Rotary embedding (rotate-half form) of x (..., H, D) with one position per token (the leading dims flattened);
    /// y may alias x. <paramref name="inverse"/> rotates by the negative angle, which is the backward pass.
    /// </summary>
    public void Rope(Tensor x, IndexTensor positions, Tensor y, float theta, bool inverse = false, RopeScaling scaling = default)
    {
        if (scaling.Type is not (RopeScaling.None or RopeScaling.Linear or RopeScaling.Llama3)) throw new ArgumentException($"rope: scaling type {scaling.Type} is not none, linear or llama3");
        if (scaling.Type != RopeScaling.None && !(scaling.Factor > 0f)) throw new ArgumentException($"rope: scaling factor must be > 0, got {scaling.Factor}");
        if (scaling.Type == RopeScaling.Llama3 && !(scaling.HighFreqFactor > scaling.LowFreqFactor && scaling.LowFreqFactor > 0f && scaling.OriginalMaxPositions > 0f))
        {
            throw new ArgumentException($"rope: llama3 scaling needs high_freq_factor > low_freq_factor > 0 and original_max_position_embeddings > 0 (got {scaling.HighFreqFactor}, " +
                $"{scaling.LowFreqFactor}, {scaling.OriginalMaxPositions})");
        }

        SameShape("rope", x, y);
        CheckIndex("rope", positions);
        if (x.Rank < 2) throw new ArgumentException($"rope: x {x} must be (..., H, D)");
        int dim = x.Dim(-1);
        int heads = x.Dim(-2);
        if (dim % 2 != 0) throw new ArgumentException($"rope: head dim D = {dim} of x {x} must be even");
        if (!(theta > 1f)) throw new ArgumentException($"rope: theta must be > 1, got {theta}");
        int tokens = x.Length / Math.Max(heads * dim, 1);
        if (positions.Length != tokens)
        {
            throw new ArgumentException($"rope: positions {positions} must hold one position per token ({tokens}) of x {x}");
        }

        foreach (int p in positions.Host)
        {
            if (p < 0) throw new ArgumentException($"rope: positions {positions} holds a negative position {p}");
        }

        device.RopeCore(x, positions, y, tokens, heads, dim, theta, inverse, scaling);
    }

    /// <summary>
    /// Grouped-query attention with online softmax. q (B, Tq, H, D); k, v (B, Tk, Hkv, D); o (B, Tq, H, D);
    /// lse (B, Tq, H) receives each row's log-sum-exp (-infinity where a query sees no key, whose output is 0).
    /// Causal masking is bottom-right aligned (query i is at position i + Tk - Tq). Scale defaults to 1/sqrt(D). A
    /// causal <paramref name="window"/> W > 0 (a sliding window, Mistral's) also hides keys W or more positions back.
    /// </summary>
    public void Attention(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float? scale = null, int window = 0)
    {
        var s = AttentionShapeOf("attention", q, k, v, o, lse, causal, scale, window);
        device.AttentionCore(q, k, v, o, lse, s);
    }

    /// <summary>Backward of <see cref="Attention"/>: dq, dk, dv overwritten; dk and dv sum over each group's heads.</summary>
    public void AttentionBackward(
        Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv, bool causal, float? scale = null, int window = 0)
    {
        var s = AttentionShapeOf("attention backward", q, k, v, o, lse, causal, scale, window);
        SameShape("attention backward", o, dO, dq);
        SameShape("attention backward", k, dk);
        SameShape("attention backward", v, dv);
        device.AttentionBackwardCore(q, k, v, o, lse, dO, dq, dk, dv, s);
    }

    /// <summary>y (N, D) = table[ids] for table (V, D) and ids (N); every id must be in [0, V).</summary>
    public void Embedding(IndexTensor ids, Tensor table, Tensor y)
    {
        Check("embedding", table, y);
        CheckIndex("embedding", ids);
        if (table.Rank != 2) throw new ArgumentException($"embedding: table {table} must be (V, D)");
        int dim = table.Dim(1);
        Expect("embedding", y, ids.Length * dim, $"(N = {ids.Length}, D = {dim}) for ids {ids} and table {table}");
        CheckRange("embedding", ids, table.Dim(0), $"rows of table {table}");
        device.EmbeddingCore(ids, table, y, dim);
    }

    /// <summary>dtable (V, D) = scatter-add of dy (N, D) by ids; rows no id uses become 0.</summary>
    public void EmbeddingBackward(IndexTensor ids, Tensor dy, Tensor dtable)
    {
        Check("embedding backward", dy, dtable);
        CheckIndex("embedding backward", ids);
        if (dtable.Rank != 2) throw new ArgumentException($"embedding backward: dtable {dtable} must be (V, D)");
        int dim = dtable.Dim(1);
        Expect("embedding backward", dy, ids.Length * dim, $"(N = {ids.Length}, D = {dim})");
        CheckRange("embedding backward", ids, dtable.Dim(0), $"rows of dtable {dtable}");
        device.EmbeddingBackwardCore(ids, dy, dtable, dim);
    }

    /// <summary>
    /// Per-row cross-entropy from logits (N, V) and targets (N) into losses (N); rows whose target is
    /// <paramref name="ignoreIndex"/> get 0. Returns the number of rows counted (for a mean).
    /// </summary>
    public int CrossEntropy(Tensor logits, IndexTensor targets, Tensor losses, int ignoreIndex = -100)
    {
        int vocab = CheckCrossEntropy("cross-entropy", logits, targets, ignoreIndex);
        Check("cross-entropy", losses);
        Expect("cross-entropy", losses, targets.Length, $"one loss per row ({targets.Length})");
        device.CrossEntropyCore(logits, targets, losses, vocab, ignoreIndex);
        return CountCounted(targets, ignoreIndex);
    }

    /// <summary>dlogits = scale * (softmax(logits) - onehot(target)), 0 on ignored rows. Use scale = 1 / counted rows for the mean loss.</summary>
    public void CrossEntropyBackward(Tensor logits, IndexTensor targets, Tensor dlogits, float scale, int ignoreIndex = -100)
    {
        int vocab = CheckCrossEntropy("cross-entropy backward", logits, targets, ignoreIndex);
        SameShape("cross-entropy backward", logits, dlogits);
        device.CrossEntropyBackwardCore(logits, targets, dlogits, vocab, ignoreIndex, scale);
    }

    /// <summary>One AdamW step (PyTorch semantics, decoupled weight decay, bias correction) on p with state m, v.</summary>
    public void AdamW(Tensor p, Tensor g, Tensor m, Tensor v, AdamWStep step)
    {
        SameShape("adamw", p, g, m, v);
        if (step.Step < 1) throw new ArgumentException($"adamw: step must be >= 1, got {step.Step}");
        device.AdamWCore(p, g, m, v, step);
    }

    /// <summary>One SGD step; <paramref name="momentum"/> is required when step.Momentum is not 0.</summary>
    public void Sgd(Tensor p, Tensor g, Tensor? momentum, SgdStep step)
    {
        SameShape("sgd", p, g);
        if (step.Momentum != 0f)
        {
            if (momentum == null) throw new ArgumentException($"sgd: momentum {step.Momentum} needs a momentum buffer for {p}");
            SameShape("sgd", p, momentum);
        }

        device.SgdCore(p, g, momentum, step);
    }

    /// <summary>Sum of all elements, accumulated in double on the host from fixed-order partial sums.</summary>
    public double Sum(Tensor x)
    {
        Check("sum", x);
        return device.SumCore(x, squares: false);
    }

    public double SumSquares(Tensor x)
    {
        Check("sum of squares", x);
        return device.SumCore(x, squares: true);
    }

    /// <summary>The L2 norm of all tensors taken together (gradient clipping's global norm).</summary>
    public double GlobalNorm(IEnumerable<Tensor> tensors)
    {
        double acc = 0;
        foreach (var t in tensors) acc += SumSquares(t);
        return Math.Sqrt(acc);
    }

    /// <summary>Scales the tensors so their global norm is at most <paramref name="maxNorm"/>; returns the norm before clipping.</summary>
    public double ClipGlobalNorm(IReadOnlyList<Tensor> tensors, double maxNorm)
    {
        double norm = GlobalNorm(tensors);
        if (norm > maxNorm && norm > 0)
        {
            float s = (float)(maxNorm / (norm + 1e-6));
            foreach (var t in tensors) Scale(t, s, t);
        }

        return norm;
    }

    private AttentionShape AttentionShapeOf(string op, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float? scale, int window = 0)
    {
        if (window < 0 || (window > 0 && !causal)) throw new ArgumentException($"{op}: a sliding window ({window}) must be positive and causal");
        Check(op, q, k, v, o, lse);
        if (q.Rank != 4 || k.Rank != 4 || v.Rank != 4)
        {
            throw new ArgumentException($"{op}: q {q}, k {k}, v {v} must be rank 4: q (B, Tq, H, D), k and v (B, Tk, Hkv, D)");
        }

        int b = q.Dim(0), tq = q.Dim(1), h = q.Dim(2), d = q.Dim(3);
        int tk = k.Dim(1), hkv = k.Dim(2);
        if (k.Dim(0) != b || k.Dim(3) != d)
        {
            throw new ArgumentException($"{op}: k {k} must be (B = {b}, Tk, Hkv, D = {d}) to match q {q}");
        }

        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"{op}: v {v} must have the shape of k {k}");
        if (hkv == 0 || h % hkv != 0) throw new ArgumentException($"{op}: H = {h} of q {q} must be a multiple of Hkv = {hkv} of k {k}");
        if (!o.Shape.SequenceEqual(q.Shape)) throw new ArgumentException($"{op}: o {o} must have the shape of q {q}");
        Expect(op, lse, b * h * tq, $"(B = {b}, Tq = {tq}, H = {h})");
        return new AttentionShape(b, tq, tk, h, hkv, d, causal, scale ?? (float)(1.0 / Math.Sqrt(d)), window);
    }

    private int CheckCrossEntropy(string op, Tensor logits, IndexTensor targets, int ignoreIndex)
    {
        Check(op, logits);
        CheckIndex(op, targets);
        if (logits.Rank != 2) throw new ArgumentException($"{op}: logits {logits} must be (N, V)");
        int vocab = logits.Dim(1);
        if (targets.Length != logits.Dim(0))
        {
            throw new ArgumentException($"{op}: targets {targets} must hold one target per row of logits {logits}");
        }

        foreach (int t in targets.Host)
        {
            if (t != ignoreIndex && (t < 0 || t >= vocab))
            {
                throw new ArgumentException($"{op}: target {t} in {targets} is outside [0, {vocab}) of logits {logits} and is not the ignore index {ignoreIndex}");
            }
        }

        return vocab;
    }

    private static int CountCounted(IndexTensor targets, int ignoreIndex)
    {
        int n = 0;
        foreach (int t in targets.Host) n += t == ignoreIndex ? 0 : 1;
        return n;
    }

    private static void CheckRange(string op, IndexTensor ids, int limit, string what)
    {
        foreach (int id in ids.Host)
        {
            if (id < 0 || id >= limit) throw new ArgumentException($"{op}: id {id} in {ids} is outside [0, {limit}), the {what}");
        }
    }

    /// <summary>Checks a mixed-variant call: x (M, K) and y (M, N) against the pool, one index in [-1, count) per row. Returns M.</summary>
    private int CheckMixed(string op, string kind, Tensor x, Tensor y, Device poolDevice, int inFeatures, int outFeatures, int count, IndexTensor rowIndex)
    {
        Check(op, x, y);
        CheckIndex(op, rowIndex);
        if (!ReferenceEquals(poolDevice, device)) throw new ArgumentException($"{op}: the pool lives on {poolDevice.Info.Spec}, not on {device.Info.Spec}");
        if (x.Dim(-1) != inFeatures) throw new ArgumentException($"{op}: x {x} has {x.Dim(-1)} input features; the pool's {kind}s take {inFeatures}");
        int rows = x.Length / Math.Max(1, inFeatures);
        Expect(op, y, rows * outFeatures, $"(M = {rows}, N = {outFeatures}) for x {x}");
        if (rowIndex.Length != rows) throw new ArgumentException($"{op}: row {kind}s {rowIndex} must name one {kind} (or -1) per row of x {x} ({rows})");
        foreach (int a in rowIndex.Host)
        {
            if (a < -1 || a >= count) throw new ArgumentException($"{op}: {kind} index {a} in {rowIndex} is outside [-1, {count})");
        }

        return rows;
    }

    private static void Expect(string op, Tensor t, int length, string what)
    {
        if (t.Length != length) throw new ArgumentException($"{op}: {t} should hold {length} elements: {what}");
    }

    private void SameShape(string op, Tensor first, params Tensor[] others)
    {
        Check(op, first);
        Check(op, others);
        foreach (var t in others)
        {
            if (!t.Shape.SequenceEqual(first.Shape))
            {
                throw new ArgumentException($"{op}: shapes differ: {first} and {t}");
            }
        }
    }

    private void Check(string op, params Tensor[] tensors)
    {
        foreach (var t in tensors)
        {
            ArgumentNullException.ThrowIfNull(t);
            t.ThrowIfDisposed();
            if (!ReferenceEquals(t.Device, device))
            {
                throw new ArgumentException($"{op}: tensor {t} lives on {t.Device.Info.Spec}, not on {device.Info.Spec}");
            }
        }
    }

    private void CheckIndex(string op, IndexTensor t)
    {
        ArgumentNullException.ThrowIfNull(t);
        t.ThrowIfDisposed();
        if (!ReferenceEquals(t.Device, device))
        {
            throw new ArgumentException($"{op}: index tensor {t} lives on {t.Device.Info.Spec}, not on {device.Info.Spec}");
        }
    }
}
