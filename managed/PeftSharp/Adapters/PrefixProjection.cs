using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

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
