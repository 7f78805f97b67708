using PeftSharp.Adapters;
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

    /// <summary>
    /// Refuses a sliding window that a layout's shared levels (virtual tokens, a prompt shared by completions) would
    /// have to leave: those levels are attended as a whole, which is exact only while every position is inside the window.
    /// </summary>
    protected static void CheckWindowCoversLevels(int window, int positions, string levels)
    {
        if (window > 0 && positions > window)
        {
            throw new NotSupportedException($"sliding_window = {window} with {levels}: {positions} positions reach past the window, where the shared " +
                "keys would leave it; only sequences within the window are supported with them");
        }
    }

    protected static Tensor Lse(Tensor lse, int b, int rows) => lse.Reshape(b, rows, lse.Dim(2));
}

/// <summary>
/// B sequences of T tokens, causal, optionally behind trainable virtual tokens (prefix tuning): every sequence
/// reads the same per-layer prefix keys and values, a shared prefix to the attention kernels; positions then start
/// after the virtual tokens, as transformers numbers them after a cache of that length.
/// </summary>
internal sealed class BatchLayout : AttentionLayout
{
    private readonly int batch, tokens, window;
    private readonly VirtualPrefix? prefix;

    /// <param name="window">The config's sliding window (0: none).</param>
    public BatchLayout(int batch, int tokens, VirtualPrefix? prefix, int window = 0)
    {
        this.batch = batch;
        this.tokens = tokens;
        this.prefix = prefix;
        this.window = window;
        int start = prefix?.Tokens ?? 0;
        if (prefix != null) CheckWindowCoversLevels(window, start + tokens, $"{start} virtual tokens (prefix tuning)");
        Positions = Enumerable.Range(0, batch * tokens).Select(i => start + i % tokens).ToArray();
    }

    public override int Rows => batch * tokens;

    public override int[] Positions { get; }

    public override void Forward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)
    {
        if (prefix == null)
        {
            ops.Attention(As4(q, batch, tokens), As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens), causal: true, window: window);
            return;
        }

        ops.SharedPrefixAttention(As4(q, batch, tokens), new[] { prefix.Level(layer, batch) }, As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens));
    }

    public override void Backward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv)
    {
        if (prefix == null)
        {
            ops.AttentionBackward(As4(q, batch, tokens), As4(k, batch, tokens), As4(v, batch, tokens), As4(o, batch, tokens), Lse(lse, batch, tokens),
                As4(dO, batch, tokens), As4(dq, batch, tokens), As4(dk, batch, tokens), As4(dv, batch, tokens), causal: true, window: window);
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

    public GroupedLayout(int sharedRows, int groups, int rowsPerCompletion, VirtualPrefix? prefix = null, int window = 0)
    {
        shared = sharedRows;
        this.groups = groups;
        each = rowsPerCompletion;
        this.prefix = prefix;
        int start = prefix?.Tokens ?? 0;
        CheckWindowCoversLevels(window, start + shared + each, "grouped completions (a prompt shared by its completions)");
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
