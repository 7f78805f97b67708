using PeftSharp.Kernels.Optim;

namespace PeftSharp.Engine;

public sealed partial class Ops
{
    /// <summary>
    /// AdamW over the masked entries of p only: p[idx[j]] with gradient g[idx[j]] and moments m[j], v[j] (nnz each),
    /// so optimizer state grows with the mask, not the tensor. Every other entry of p is left bit-identical.
    /// </summary>
    public void MaskedAdamW(Tensor p, Tensor g, IndexTensor idx, Tensor m, Tensor v, AdamWStep step)
    {
        CheckMask("masked adamw", p, idx);
        SameShape("masked adamw", p, g);
        Check("masked adamw", m, v);
        Expect("masked adamw", m, idx.Length, $"(nnz = {idx.Length}) for mask {idx}");
        Expect("masked adamw", v, idx.Length, $"(nnz = {idx.Length}) for mask {idx}");
        if (idx.Length > 0) device.MaskedAdamWCore(p, g, idx, m, v, step);
    }

    /// <summary>SGD over the masked entries of p; <paramref name="momentum"/> buffer (nnz) when step.Momentum is not 0.</summary>
    public void MaskedSgd(Tensor p, Tensor g, IndexTensor idx, Tensor? momentum, SgdStep step)
    {
        CheckMask("masked sgd", p, idx);
        SameShape("masked sgd", p, g);
        if (step.Nesterov) throw new NotSupportedException("masked sgd: Nesterov momentum is not implemented");
        if (step.Momentum != 0f)
        {
            if (momentum == null) throw new ArgumentException("masked sgd: momentum is not 0 but no buffer was given");
            Expect("masked sgd", momentum, idx.Length, $"(nnz = {idx.Length})");
        }

        if (idx.Length > 0) device.MaskedSgdCore(p, g, idx, momentum, step);
    }

    /// <summary>w[idx[j]] += alpha * values[j]: applies (alpha 1) or removes (alpha -1) a sparse delta in place.</summary>
    public void ScatterAdd(Tensor w, IndexTensor idx, Tensor values, float alpha = 1f)
    {
        CheckMask("scatter add", w, idx);
        Check("scatter add", values);
        Expect("scatter add", values, idx.Length, $"(nnz = {idx.Length}) for indices {idx}");
        if (idx.Length > 0) device.ScatterAddCore(w, idx, values, alpha);
    }

    /// <summary>values[j] = w[idx[j]].</summary>
    public void Gather(Tensor w, IndexTensor idx, Tensor values)
    {
        CheckMask("gather", w, idx, distinct: false);
        Check("gather", values);
        Expect("gather", values, idx.Length, $"(nnz = {idx.Length}) for indices {idx}");
        if (idx.Length > 0) device.GatherCore(w, idx, values);
    }

    /// <summary>
    /// DARE drop-and-rescale: y = x / (1 - p) where a counter-based uniform draw for (seed, element) is at least p,
    /// else 0; deterministic for a seed on every backend. p = 0 copies x exactly. y may alias x.
    /// </summary>
    public void Dare(Tensor x, Tensor y, float p, int seed)
    {
        SameShape("dare", x, y);
        if (p is < 0f or >= 1f || float.IsNaN(p)) throw new ArgumentException($"dare: drop probability {p} must be in [0, 1)");
        if (x.Length > 0) device.DareCore(x, y, p, seed);
    }

    /// <summary>y (M, N) += each row's sparse delta applied to x (M, K): rows with variant -1 are untouched.</summary>
    public void SparseDeltaMixed(Tensor x, Tensor y, SparseDeltaPool pool, IndexTensor rowVariants)
    {
        int rows = CheckMixed("sparse mixed", "variant", x, y, pool.Device, pool.InFeatures, pool.OutFeatures, pool.Count, rowVariants);

        if (pool.Count > 0 && rows > 0 && pool.OutFeatures > 0) device.SparseDeltaMixedCore(x, y, pool, rowVariants, rows);
    }

    private void CheckMask(string op, Tensor t, IndexTensor idx, bool distinct = true)
    {
        Check(op, t);
        CheckIndex(op, idx);
        var host = idx.Host;
        var seen = distinct ? new HashSet<int>() : null;
        foreach (int i in host)
        {
            if (i < 0 || i >= t.Length) throw new ArgumentException($"{op}: index {i} in {idx} is outside {t} (length {t.Length})");
            if (seen != null && !seen.Add(i)) throw new ArgumentException($"{op}: index {i} appears twice in {idx}; a mask's indices must be distinct");
        }
    }
}
