using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// A LoRA layer on one linear module: y = x W^T + Scale * ((dropout(x) A^T) B^T + 1 b^T), A (R, in), B (out, R), and
/// b (out) lora_B's bias where PEFT's lora_bias gives one. <see cref="DoraLayer"/> adds DoRA's magnitude.
/// </summary>
public class LoraLayer : IAdapterLayer
{
    internal LoraLayer(string module, Parameter a, Parameter b, int rank, float scale, float dropout)
    {
        Module = module;
        A = a;
        B = b;
        Rank = rank;
        Scale = scale;
        Dropout = dropout;
    }

    /// <summary>The module it adapts (model.layers.0.self_attn.q_proj).</summary>
    public string Module { get; }

    public Parameter A { get; }
    public Parameter B { get; }
    public int Rank { get; }
    public float Scale { get; }

    /// <summary>Probability of zeroing an input of the LoRA branch while training (inputs kept are scaled by 1 / (1 - p)).</summary>
    public float Dropout { get; }

    /// <summary>DoRA's magnitude vector (out), or null for plain LoRA.</summary>
    public virtual Parameter? Magnitude => null;

    /// <summary>lora_B's bias b (out) under PEFT's lora_bias, or null.</summary>
    public Parameter? BiasB { get; init; }

    public virtual IEnumerable<Parameter> Parameters => BiasB == null ? new[] { A, B } : new[] { A, B, BiasB };

    protected Ops Ops => A.Value.Device.Ops;

    protected Device Device => A.Value.Device;

    public virtual IDisposable? Forward(Parameter weight, Tensor x, Tensor y, bool training, int dropoutSeed)
    {
        var saved = new LoraSaved();
        try
        {
            AddLowRank(x, y, training, dropoutSeed, saved);
        }
        catch
        {
            saved.Dispose();
            throw;
        }

        return Keep(saved, training);
    }

    public virtual void Backward(Parameter weight, Tensor x, Tensor dy, Tensor dx, IDisposable saved)
    {
        Ops.LinearBackward(x, weight.Value, dy, dx, weight.Trainable ? weight.Grad : null, accumulateWeight: true);
        AddLowRankBackward(x, dy, dx, (LoraSaved)saved);
    }

    public virtual void MergeInto(Tensor weight) => Ops.MatMul(B.Value, A.Value, weight, alpha: Scale, beta: 1f);

    /// <summary>y += Scale (dropout(x) A^T) B^T; what the backward needs goes into <paramref name="saved"/>.</summary>
    internal void AddLowRank(Tensor x, Tensor y, bool training, int dropoutSeed, LoraSaved saved)
    {
        Shrink(x, training, dropoutSeed, saved);
        Ops.MatMul(saved.T, B.Value, y, transposeB: true, alpha: Scale, beta: 1f);
        if (BiasB != null) RowBroadcast.AddToRows(y, BiasB.Value, Scale);
    }

    /// <summary>The low-rank path's backward: dB += s dy^T t, db += s dy^T 1, dA += (s dy B)^T x_dropped, dx += (s dy B) A (masked by dropout).</summary>
    internal void AddLowRankBackward(Tensor x, Tensor dy, Tensor dx, LoraSaved saved)
    {
        var ops = Ops;
        if (BiasB is { Trainable: true }) RowBroadcast.AddColumnSums(dy, BiasB.Grad, Scale);
        if (B.Trainable) ops.MatMul(dy, saved.T, B.Grad, transposeA: true, alpha: Scale, beta: 1f);
        using var dt = Device.Zeros(Module + ".lora_dt", x.Dim(0), Rank);
        ops.MatMul(dy, B.Value, dt, alpha: Scale);
        if (A.Trainable) ops.MatMul(dt, saved.XDropped ?? x, A.Grad, transposeA: true, beta: 1f);
        if (saved.Mask == null)
        {
            ops.MatMul(dt, A.Value, dx, beta: 1f);
        }
        else
        {
            using var dxLora = Device.Zeros(Module + ".lora_dx", x.Shape.ToArray());
            ops.MatMul(dt, A.Value, dxLora);
            ops.Mul(dxLora, saved.Mask, dxLora);
            ops.Add(dx, dxLora, dx);
        }
    }

    /// <summary>
    /// The low-rank path's first half for x (rows, in): dropout when training (mask and x_dropped kept in
    /// <paramref name="saved"/>), then t = x A^T into saved.T. Returns the LoRA input (x or x_dropped).
    /// </summary>
    private protected Tensor Shrink(Tensor x, bool training, int dropoutSeed, LoraSaved saved)
    {
        int rows = x.Dim(0);
        var input = x;
        if (training && Dropout > 0f)
        {
            saved.Mask = Device.FromArray(Module + ".dropout_mask", DropoutMask(rows * x.Dim(1), Dropout, dropoutSeed), rows, x.Dim(1));
            saved.XDropped = Device.Zeros(Module + ".x_dropped", rows, x.Dim(1));
            Ops.Mul(x, saved.Mask, saved.XDropped);
            input = saved.XDropped;
        }

        saved.T = Device.Zeros(Module + ".lora_t", rows, Rank);
        Ops.Linear(input, A.Value, saved.T);
        return input;
    }

    private protected static IDisposable? Keep(LoraSaved saved, bool training)
    {
        if (training) return saved;
        saved.Dispose();
        return null;
    }

    /// <summary>Inverted dropout: each entry is 0 with probability p, else 1 / (1 - p), from <paramref name="seed"/>.</summary>
    private static float[] DropoutMask(int length, float p, int seed)
    {
        var rng = new Random(seed);
        float keep = 1f / (1f - p);
        var mask = new float[length];
        for (int i = 0; i < length; i++) mask[i] = rng.NextDouble() < p ? 0f : keep;
        return mask;
    }
}

/// <summary>What a LoRA module's forward keeps for its backward.</summary>
internal sealed class LoraSaved : IDisposable
{
    public Tensor T = null!;           // (rows, R): x A^T (of the dropped-out x)
    public Tensor? Mask, XDropped;     // (rows, in) when dropout is on
    public Tensor? Z, C, InvNorm;      // DoRA: the unscaled output (rows, out), m / norm and 1 / norm (out)

    public void Dispose()
    {
        foreach (var t in new[] { T, Mask, XDropped, Z, C, InvNorm }) t?.Dispose();
    }
}
