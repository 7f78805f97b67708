using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// DoRA on one linear module: a trained magnitude m (out) rescales each output of the LoRA-adapted product,
/// y = m / ||W + Scale B A||_row * (x W^T + Scale (x A^T) B^T), the norm treated as a constant in the backward pass as
/// PEFT does.
/// </summary>
public sealed class DoraLayer : LoraLayer
{
    internal DoraLayer(string module, Parameter a, Parameter b, int rank, float scale, float dropout, Parameter magnitude)
        : base(module, a, b, rank, scale, dropout)
    {
        Magnitude = magnitude;
    }

    public override Parameter Magnitude { get; }

    public override IEnumerable<Parameter> Parameters => new[] { A, B, Magnitude };

    public override IDisposable? Forward(Parameter weight, Tensor x, Tensor y, bool training, int dropoutSeed)
    {
        var ops = Ops;
        var saved = new LoraSaved();
        try
        {
            var input = Shrink(x, training, dropoutSeed, saved);
            SaveScales(weight, saved);
            if (saved.Mask != null)
            {
                // Under dropout, as PEFT computes it: the rescaling applies to the dropped-out input's base product,
                // y = W x + (c - 1) W xd + c s B A xd = W x - W xd + c z, z = W xd + s B A xd (saved).
                saved.Z = Device.Zeros(Module + ".dora_z", y.Shape.ToArray());
                using var wxd = Device.Zeros(Module + ".dora_w_xd", y.Shape.ToArray());
                ops.Linear(input, weight.Value, wxd);
                ops.Copy(wxd, saved.Z);
                ops.MatMul(saved.T, B.Value, saved.Z, transposeB: true, alpha: Scale, beta: 1f);
                ops.Axpy(-1f, wxd, y);
                ops.ScaleColumns(saved.Z, saved.C!, wxd);
                ops.Add(y, wxd, y);
                return Keep(saved, training);
            }

            ops.MatMul(saved.T, B.Value, y, transposeB: true, alpha: Scale, beta: 1f);
            if (training)
            {
                saved.Z = Device.Zeros(Module + ".dora_z", y.Shape.ToArray());
                ops.Copy(y, saved.Z);
            }

            ops.ScaleColumns(y, saved.C!, y);
        }
        catch
        {
            saved.Dispose();
            throw;
        }

        return Keep(saved, training);
    }

    /// <summary>
    /// dm += sum_rows(dy * z) / norm, then dy * m / norm goes through the LoRA-adapted product (under dropout, W x
    /// takes dy and the dropped-out input's paths take c dy - dy and c dy; see Forward).
    /// </summary>
    public override void Backward(Parameter weight, Tensor x, Tensor dy, Tensor dx, IDisposable state)
    {
        var ops = Ops;
        var saved = (LoraSaved)state;
        int rows = x.Dim(0);
        var gradW = weight.Trainable ? weight.Grad : null;
        if (Magnitude.Trainable)
        {
            using var prod = Device.Zeros(Module + ".dora_dy_z", dy.Shape.ToArray());
            ops.Mul(dy, saved.Z!, prod);
            using var ones = Device.FromArray("ones", Enumerable.Repeat(1f, rows).ToArray(), 1, rows);
            using var colSum = Device.Zeros(Module + ".dora_dm", 1, dy.Dim(1));
            ops.MatMul(ones, prod, colSum);
            ops.ScaleColumns(colSum, saved.InvNorm!, colSum);
            ops.Axpy(1f, colSum.Reshape(dy.Dim(1)), Magnitude.Grad);
        }

        using var scaledDy = Device.Zeros(Module + ".dora_dy", dy.Shape.ToArray());
        ops.ScaleColumns(dy, saved.C!, scaledDy);
        if (saved.Mask != null)
        {
            ops.LinearBackward(x, weight.Value, dy, dx, gradW, accumulateWeight: true);
            using var h = Device.Zeros(Module + ".dora_dy_minus", dy.Shape.ToArray());
            ops.Copy(scaledDy, h);
            ops.Axpy(-1f, dy, h);
            using var dxd = Device.Zeros(Module + ".dora_dxd", x.Shape.ToArray());
            ops.LinearBackward(saved.XDropped!, weight.Value, h, dxd, gradW, accumulateWeight: true);
            if (B.Trainable) ops.MatMul(scaledDy, saved.T, B.Grad, transposeA: true, alpha: Scale, beta: 1f);
            using var dtd = Device.Zeros(Module + ".lora_dt", rows, Rank);
            ops.MatMul(scaledDy, B.Value, dtd, alpha: Scale);
            if (A.Trainable) ops.MatMul(dtd, saved.XDropped!, A.Grad, transposeA: true, beta: 1f);
            ops.MatMul(dtd, A.Value, dxd, beta: 1f);
            ops.Mul(dxd, saved.Mask, dxd);
            ops.Add(dx, dxd, dx);
            return;
        }

        ops.LinearBackward(x, weight.Value, scaledDy, dx, gradW, accumulateWeight: true);
        AddLowRankBackward(x, scaledDy, dx, saved);
    }

    /// <summary>W' = m / ||W + s B A||_row * (W + s B A).</summary>
    public override void MergeInto(Tensor weight)
    {
        int inF = weight.Dim(1);
        var norm = Norms(weight);
        var m = Magnitude.Value.ToArray();
        base.MergeInto(weight);
        var host = weight.ToArray();
        for (int i = 0; i < host.Length; i++) host[i] *= (float)(m[i / inF] / norm[i / inF]);
        weight.CopyFrom(host);
    }

    /// <summary>||W + s B A|| of every output row (out), in double: DoRA's column norm, a constant to the backward.</summary>
    internal double[] Norms(Tensor weight) =>
        LoraMerge.MergedRowNorms(weight, A.Value, B.Value, Scale).Select(v => Math.Max(v, 1e-12)).ToArray();

    /// <summary>c = m / norm and 1 / norm (out), on the device.</summary>
    private void SaveScales(Parameter weight, LoraSaved saved)
    {
        var norm = Norms(weight.Value);
        var m = Magnitude.Value.ToArray();
        saved.C = Device.FromArray(Module + ".dora_scale", m.Select((v, i) => (float)(v / norm[i])).ToArray(), m.Length);
        saved.InvNorm = Device.FromArray(Module + ".dora_inv_norm", norm.Select(v => (float)(1.0 / v)).ToArray(), m.Length);
    }
}
