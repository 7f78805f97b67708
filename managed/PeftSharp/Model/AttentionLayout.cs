using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// How the N rows of a training pass attend to each other. Every other op of the model is row-wise, so the layout is
/// the only thing that differs between a plain batch of sequences, a batch behind trainable virtual tokens (prefix
/// tuning) and one prompt shared by many completions (Prefix Grouper). q, o are (1, N, H, D), k, v (1, N, Hkv, D),
/// lse (1, N, H), all in row order.
/// </summary>
internal abstract class AttentionLayout
{
    /// <summary>Rows of the pass (N).</summary>
    public abstract int Rows { get; }

    /// <summary>Rotary position of each row.</summary>
    public abstract int[] Positions { get; }

    public abstract void Forward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse);

    /// <summary>Overwrites dq, dk, dv; adds into the gradients of any trainable keys and values the layout owns.</summary>
    public abstract void Backward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv);

    protected static Tensor As4(Tensor t, int b, int rows) => t.Reshape(b, rows, t.Dim(2), t.Dim(3));

    protected static Tensor Lse(Tensor lse, int b, int rows) => lse.Reshape(b, rows, lse.Dim(2));
}

/// <summary>
/// B sequences of T tokens, causal, optionally behind trainable virtual tokens (prefix tuning): every sequence
/// reads the same per-layer prefix keys and values, a shared prefix to the attention kernels; positions then start
/// after the virtual tokens, as transformers numbers them after a cache of that length.
/// </summary>
internal sealed class BatchLayout : AttentionLayout
{
    private readonly int batch, tokens;
    private readonly VirtualPrefix? prefix;

    public BatchLayout(int batch, int tokens, VirtualPrefix? prefix)
    {
        this.batch = batch;
        this.tokens = tokens;
        this.prefix = prefix;
        int start = prefix?.Tokens ?? 0;
        Positions = Enumerable.Range(0, batch * tokens).Select(i => start + i % tokens).ToArray();
    }

    public override int Rows => batch * tokens;

    public override int[] Positions { get; }

    public override void Forward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)
    {
        if (prefix == null)
        {
            ops.Attention(As4(q, batch, tokens), As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens), causal: true);
            return;
        }

        ops.SharedPrefixAttention(As4(q, batch, tokens), new[] { prefix.Level(layer, batch) }, As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens));
    }

    public override void Backward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv)
    {
        if (prefix == null)
        {
            ops.AttentionBackward(As4(q, batch, tokens), As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens),
                As4(dO, batch, tokens), As4(dq, batch, tokens), As4(dk, batch, tokens), As4(dv, batch, tokens), causal: true);
            return;
        }

        var level = prefix.Level(layer, batch);
        using var dpk = prefix.Keys[layer].Value.Device.Zeros("prefix_dk", level.Keys.Shape.ToArray());
        using var dpv = prefix.Keys[layer].Value.Device.Zeros("prefix_dv", level.Values.Shape.ToArray());
        ops.SharedPrefixAttentionBackward(As4(q, batch, tokens), new[] { level }, As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens),
            As4(dO, batch, tokens), As4(dq, batch, tokens), new[] { dpk }, new[] { dpv }, As4(dk, batch, tokens), As4(dv, batch, tokens));
        if (prefix.Keys[layer].Trainable) ops.Axpy(1f, dpk.Reshape(prefix.Keys[layer].Grad.Shape.ToArray()), prefix.Keys[layer].Grad);
        if (prefix.Values[layer].Trainable) ops.Axpy(1f, dpv.Reshape(prefix.Values[layer].Grad.Shape.ToArray()), prefix.Values[layer].Grad);
    }
}

/// <summary>
/// One prompt and G completions (Prefix Grouper). Rows: the prompt but its last token (P - 1 rows, encoded once),
/// then each completion's rows: the prompt's last token followed by the completion (C rows each, padded to one
/// length). Each completion attends to [the shared prompt rows' keys and values, its own rows causally]; positions
/// continue after the prompt for every completion. Carrying the last prompt token into each completion lets its
/// logit predict that completion's first token; everything equals the batch with the prompt copied G times, and
/// the shared prompt rows' key/value gradients sum over the completions. With prefix tuning the virtual tokens are
/// one more shared level above the prompt (a two-level tree for the completions, one level for the prompt rows),
/// and every position starts after them.
/// </summary>
internal sealed class GroupedLayout : AttentionLayout
{
    private readonly int shared, groups, each;
    private readonly VirtualPrefix? prefix;

    public GroupedLayout(int sharedRows, int groups, int rowsPerCompletion, VirtualPrefix? prefix = null)
    {
        shared = sharedRows;
        this.groups = groups;
        each = rowsPerCompletion;
        this.prefix = prefix;
        int start = prefix?.Tokens ?? 0;
        Positions = Enumerable.Range(0, shared).Concat(Enumerable.Range(0, groups).SelectMany(_ => Enumerable.Range(shared, each))).Select(p => start + p).ToArray();
    }

    public override int Rows => shared + groups * each;

    public override int[] Positions { get; }

    private (Tensor Shared, Tensor Own) Split(Tensor t) =>
        (t.View(0, 1, shared, t.Dim(2), t.Dim(3)), t.View(shared * t.Dim(2) * t.Dim(3), groups, each, t.Dim(2), t.Dim(3)));

    private (Tensor Shared, Tensor Own) SplitLse(Tensor lse) => (lse.View(0, 1, shared, lse.Dim(2)), lse.View(shared * lse.Dim(2), groups, each, lse.Dim(2)));

    /// <summary>The shared levels above the completions: the virtual tokens (when any), then the prompt rows.</summary>
    private PrefixLevel[] CompletionLevels(int layer, Tensor ks, Tensor vs)
    {
        var prompt = new PrefixLevel(ks, vs, new int[groups]);
        return prefix == null ? new[] { prompt } : new[] { prefix.Level(layer, groups), prompt };
    }

    public override void Forward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)
    {
        var (qs, qo) = Split(q);
        var (ks, ko) = Split(k);
        var (vs, vo) = Split(v);
        var (os, oo) = Split(o);
        var (ls, lo) = SplitLse(lse);
        if (shared > 0)
        {
            if (prefix == null) ops.Attention(qs, ks, vs, os, ls, causal: true);
            else ops.SharedPrefixAttention(qs, new[] { prefix.Level(layer, 1) }, ks, vs, os, ls);
        }

        ops.SharedPrefixAttention(qo, CompletionLevels(layer, ks, vs), ko, vo, oo, lo);
    }

    public override void Backward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv)
    {
        var (qs, qo) = Split(q);
        var (ks, ko) = Split(k);
        var (vs, vo) = Split(v);
        var (os, oo) = Split(o);
        var (ls, lo) = SplitLse(lse);
        var (dOs, dOo) = Split(dO);
        var (dqs, dqo) = Split(dq);
        var (dks, dko) = Split(dk);
        var (dvs, dvo) = Split(dv);
        var d = k.Device;
        using var dkShared = d.Zeros("prompt_dk_from_completions", ks.Shape.ToArray());
        using var dvShared = d.Zeros("prompt_dv_from_completions", vs.Shape.ToArray());
        var levels = CompletionLevels(layer, ks, vs);
        using var dkVirtual = prefix == null ? null : d.Zeros("prefix_dk", levels[0].Keys.Shape.ToArray());
        using var dvVirtual = prefix == null ? null : d.Zeros("prefix_dv", levels[0].Values.Shape.ToArray());
        var dLevelK = prefix == null ? new[] { dkShared } : new[] { dkVirtual!, dkShared };
        var dLevelV = prefix == null ? new[] { dvShared } : new[] { dvVirtual!, dvShared };
        ops.SharedPrefixAttentionBackward(qo, levels, ko, vo, oo, lo, dOo, dqo, dLevelK, dLevelV, dko, dvo);
        if (shared > 0)
        {
            if (prefix == null)
            {
                ops.AttentionBackward(qs, ks, vs, os, ls, dOs, dqs, dks, dvs, causal: true);
            }
            else
            {
                using var dkPromptVirtual = d.Zeros("prefix_dk_prompt", levels[0].Keys.Shape.ToArray());
                using var dvPromptVirtual = d.Zeros("prefix_dv_prompt", levels[0].Values.Shape.ToArray());
                ops.SharedPrefixAttentionBackward(qs, new[] { prefix.Level(layer, 1) }, ks, vs, os, ls, dOs, dqs, new[] { dkPromptVirtual }, new[] { dvPromptVirtual }, dks, dvs);
                ops.Add(dkVirtual!, dkPromptVirtual, dkVirtual!);
                ops.Add(dvVirtual!, dvPromptVirtual, dvVirtual!);
            }

            ops.Add(dks, dkShared, dks);
            ops.Add(dvs, dvShared, dvs);
        }

        if (prefix != null)
        {
            if (prefix.Keys[layer].Trainable) ops.Axpy(1f, dkVirtual!.Reshape(prefix.Keys[layer].Grad.Shape.ToArray()), prefix.Keys[layer].Grad);
            if (prefix.Values[layer].Trainable) ops.Axpy(1f, dvVirtual!.Reshape(prefix.Values[layer].Grad.Shape.ToArray()), prefix.Values[layer].Grad);
        }
    }
}

/// <summary>
/// Prefix tuning's trainable virtual tokens: per layer, keys and values (P, Hkv, D) that every sequence reads as a
/// shared prefix (used as they are: transformers treats them as an already-rotated cache). With a
/// <see cref="Projection"/> (P-tuning v2's reparameterisation) the keys and values are computed from it before each
/// pass and its parameters train instead.
/// </summary>
public sealed class VirtualPrefix : IDisposable
{
    public VirtualPrefix(IReadOnlyList<Parameter> keys, IReadOnlyList<Parameter> values, PrefixProjection? projection = null)
    {
        Keys = keys;
        Values = values;
        Projection = projection;
        Tokens = keys.Count == 0 ? 0 : keys[0].Value.Dim(0);
    }

    public IReadOnlyList<Parameter> Keys { get; }
    public IReadOnlyList<Parameter> Values { get; }

    /// <summary>The reparameterising MLP, or null when the keys and values train directly.</summary>
    public PrefixProjection? Projection { get; }

    /// <summary>Virtual tokens (P).</summary>
    public int Tokens { get; }

    /// <summary>What an optimizer steps: the projection's parameters, or the keys and values themselves.</summary>
    public IEnumerable<Parameter> Parameters => Projection?.Parameters ?? Keys.Concat(Values);

    /// <summary>Recomputes the keys and values from the projection (no-op without one); clears their gradients.</summary>
    public void Materialize() => Projection?.Forward(this);

    internal PrefixLevel Level(int layer, int batch)
    {
        var k = Keys[layer].Value;
        return new PrefixLevel(k.Reshape(1, k.Dim(0), k.Dim(1), k.Dim(2)), Values[layer].Value.Reshape(1, k.Dim(0), k.Dim(1), k.Dim(2)), new int[batch]);
    }

    public void Dispose()
    {
        foreach (var p in Keys.Concat(Values)) p.Dispose();
        Projection?.Dispose();
    }
}

/// <summary>
/// PEFT's PrefixEncoder with prefix_projection: an embedding E (P, T) through Linear(T, Hp), tanh, Linear(Hp, L * 2 *
/// T), T = Hkv * D, whose output row t holds [layer 0 key, layer 0 value, layer 1 key, ...] of virtual token t. The
/// block of the second weight's rows for one layer's keys (or values) is contiguous, so each is one Linear.
/// </summary>
public sealed class PrefixProjection : IDisposable
{
    private readonly Tensor hidden, ones;

    public PrefixProjection(Parameter embedding, Parameter w1, Parameter b1, Parameter w2, Parameter b2)
    {
        Embedding = embedding;
        W1 = w1;
        B1 = b1;
        W2 = w2;
        B2 = b2;
        var d = embedding.Value.Device;
        hidden = d.Zeros("prefix_mlp_hidden", embedding.Value.Dim(0), w1.Value.Dim(0));
        ones = d.FromArray("ones", Enumerable.Repeat(1f, embedding.Value.Dim(0)).ToArray(), embedding.Value.Dim(0), 1);
    }

    public Parameter Embedding { get; }
    public Parameter W1 { get; }
    public Parameter B1 { get; }
    public Parameter W2 { get; }
    public Parameter B2 { get; }

    public IEnumerable<Parameter> Parameters => new[] { Embedding, W1, B1, W2, B2 };

    private int TokenDim => Embedding.Value.Dim(1);

    /// <summary>keys/values[l] = tanh(E W1^T + b1) W2[block]^T + b2[block]; clears their gradients.</summary>
    internal void Forward(VirtualPrefix prefix)
    {
        var ops = Embedding.Value.Device.Ops;
        int p = Embedding.Value.Dim(0), hp = W1.Value.Dim(0), td = TokenDim;
        ops.Linear(Embedding.Value, W1.Value, hidden);
        ops.MatMul(ones, B1.Value.Reshape(1, hp), hidden, beta: 1f);
        ops.Tanh(hidden, hidden);
        for (int l = 0; l < prefix.Keys.Count; l++)
        {
            foreach (var (target, block) in new[] { (prefix.Keys[l], 2 * l), (prefix.Values[l], 2 * l + 1) })
            {
                var y = target.Value.Reshape(p, td);
                ops.Linear(hidden, W2.Value.View(block * td * hp, td, hp), y);
                ops.MatMul(ones, B2.Value.View(block * td, 1, td), y, beta: 1f);
                ops.Fill(target.Grad, 0f);
            }
        }
    }

    /// <summary>Carries the keys' and values' gradients through the MLP into its parameters' gradients.</summary>
    internal void Backward(VirtualPrefix prefix)
    {
        var d = Embedding.Value.Device;
        var ops = d.Ops;
        int p = Embedding.Value.Dim(0), hp = W1.Value.Dim(0), td = TokenDim;
        using var dHidden = d.Zeros("prefix_mlp_dhidden", p, hp);
        using var onesRow = d.FromArray("ones_row", Enumerable.Repeat(1f, p).ToArray(), 1, p);
        for (int l = 0; l < prefix.Keys.Count; l++)
        {
            foreach (var (source, block) in new[] { (prefix.Keys[l], 2 * l), (prefix.Values[l], 2 * l + 1) })
            {
                var g = source.Grad.Reshape(p, td);
                if (W2.Trainable) ops.MatMul(g, hidden, W2.Grad.View(block * td * hp, td, hp), transposeA: true, beta: 1f);
                if (B2.Trainable) ops.MatMul(onesRow, g, B2.Grad.View(block * td, 1, td), beta: 1f);
                ops.MatMul(g, W2.Value.View(block * td * hp, td, hp), dHidden, beta: 1f);
            }
        }

        ops.TanhBackward(hidden, dHidden, dHidden);
        if (W1.Trainable) ops.MatMul(dHidden, Embedding.Value, W1.Grad, transposeA: true, beta: 1f);
        if (B1.Trainable) ops.MatMul(onesRow, dHidden, B1.Grad.Reshape(1, hp), beta: 1f);
        if (Embedding.Trainable) ops.MatMul(dHidden, W1.Value, Embedding.Grad, beta: 1f);
    }

    public void Dispose()
    {
        foreach (var p in Parameters) p.Dispose();
        hidden.Dispose();
        ones.Dispose();
    }
}
