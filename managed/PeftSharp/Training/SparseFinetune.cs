using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>How a sparse fine-tune chooses its trainable entries.</summary>
public enum MaskSource
{
    /// <summary>Largest accumulated |gradient| over a few batches.</summary>
    Gradient,
    /// <summary>Largest |weight|.</summary>
    Weight,
    /// <summary>A seeded random subset.</summary>
    Random,
}

/// <summary>
/// Mask selection for sparse fine-tuning: per tensor, the top-density fraction of entries by a score (gradient
/// magnitude, weight magnitude or a seeded random draw), ties broken by position. Every trainable parameter gets
/// its share of the budget. Host-side (the selection runs once, before training).
/// </summary>
public static class SparseMasks
{
    public static Dictionary<string, int[]> Select(LlamaModel model, double density, MaskSource source, int seed, IReadOnlyList<(int[] Ids, int[] Targets)>? batches = null, int batchSize = 1)
    {
        if (density is <= 0 or > 1) throw new ArgumentException($"density {density} must be in (0, 1]");
        var trainable = model.Parameters.Where(p => p.Trainable).ToList();
        Dictionary<string, float[]>? grads = null;
        if (source == MaskSource.Gradient)
        {
            if (batches == null || batches.Count == 0) throw new ArgumentException("gradient masks need batches to accumulate gradients over");
            grads = trainable.ToDictionary(p => p.Name, p => new float[p.Value.Length]);
            foreach (var (ids, targets) in batches)
            {
                model.ZeroGrad();
                model.Loss(ids, targets, batchSize, backward: true);
                foreach (var p in trainable)
                {
                    var g = p.Grad.ToArray();
                    var acc = grads[p.Name];
                    for (int i = 0; i < g.Length; i++) acc[i] += Math.Abs(g[i]);
                }
            }

            model.ZeroGrad();
        }

        var masks = new Dictionary<string, int[]>();
        int tensor = 0;
        foreach (var p in trainable)
        {
            int n = p.Value.Length, keep = Math.Max(1, (int)Math.Round(density * n));
            float[] score = source switch
            {
                MaskSource.Gradient => grads![p.Name],
                MaskSource.Weight => p.Value.ToArray().Select(Math.Abs).ToArray(),
                _ => Enumerable.Range(0, n).Select(i => SparseKernels.Uniform(unchecked(seed * 7919 + tensor), i)).ToArray(),
            };
            masks[p.Name] = Enumerable.Range(0, n).OrderByDescending(i => score[i]).ThenBy(i => i).Take(keep).OrderBy(i => i).ToArray();
            tensor++;
        }

        return masks;
    }
}

/// <summary>
/// AdamW that steps only the masked entries of each parameter (Ops.MaskedAdamW) and keeps moments for those entries
/// alone: optimizer memory is 2 x nnz floats, not 2 x the model. Parameters without a mask are not stepped.
/// (Gradients are still computed densely by the backward pass.)
/// </summary>
public sealed class MaskedAdamW : Optimizer
{
    private readonly Dictionary<Parameter, (IndexTensor Mask, Tensor M, Tensor V)> state = new();

    public MaskedAdamW(IEnumerable<Parameter> parameters, IReadOnlyDictionary<string, int[]> masks, float beta1 = 0.9f, float beta2 = 0.999f, float epsilon = 1e-8f, float weightDecay = 0f)
        : base(parameters.Where(p => masks.ContainsKey(p.Name)))
    {
        Beta1 = beta1;
        Beta2 = beta2;
        Epsilon = epsilon;
        WeightDecay = weightDecay;
        foreach (var p in Parameters)
        {
            var idx = masks[p.Name];
            var d = p.Value.Device;
            state[p] = (d.FromIndices(p.Name + ".mask", idx), d.Zeros(p.Name + ".exp_avg", Math.Max(1, idx.Length)), d.Zeros(p.Name + ".exp_avg_sq", Math.Max(1, idx.Length)));
        }
    }

    public float Beta1 { get; }
    public float Beta2 { get; }
    public float Epsilon { get; }
    public float WeightDecay { get; }

    /// <summary>Optimizer state in floats: two moments per masked entry.</summary>
    public long StateFloats => state.Values.Sum(s => 2L * s.Mask.Length);

    public override void Step(float learningRate)
    {
        StepCount++;
        foreach (var (p, (mask, m, v)) in state)
        {
            if (!p.Trainable || mask.Length == 0) continue;
            p.Value.Device.Ops.MaskedAdamW(p.Value, p.Grad, mask, m, v,
                new AdamWStep(learningRate * LearningRateScale(p.Name), Beta1, Beta2, Epsilon, WeightDecay, StepCount));
        }
    }

    /// <summary>The current mask of each parameter.</summary>
    public IReadOnlyDictionary<string, int[]> Masks => state.ToDictionary(s => s.Key.Name, s => s.Value.Mask.Values.ToArray());

    /// <summary>
    /// Swaps a parameter's mask: entries that stay keep their moments, new entries start at zero (SpIEL's regrowth).
    /// </summary>
    public void Replace(Parameter p, int[] mask)
    {
        if (!state.TryGetValue(p, out var old)) throw new ArgumentException($"{p.Name} has no mask in this optimizer");
        var d = p.Value.Device;
        var oldIdx = old.Mask.Values.ToArray();
        var oldM = old.M.ToArray();
        var oldV = old.V.ToArray();
        var at = new Dictionary<int, int>();
        for (int j = 0; j < oldIdx.Length; j++) at[oldIdx[j]] = j;
        var sorted = mask.OrderBy(i => i).ToArray();
        int n = Math.Max(1, sorted.Length);
        var m = new float[n];
        var v = new float[n];
        for (int j = 0; j < sorted.Length; j++)
        {
            if (at.TryGetValue(sorted[j], out int k))
            {
                m[j] = oldM[k];
                v[j] = oldV[k];
            }
        }

        old.Mask.Dispose();
        old.M.Dispose();
        old.V.Dispose();
        state[p] = (d.FromIndices(p.Name + ".mask", sorted), d.FromArray(p.Name + ".exp_avg", m, n), d.FromArray(p.Name + ".exp_avg_sq", v, n));
    }

    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState()
    {
        foreach (var (p, (_, m, v)) in state)
        {
            yield return (p.Name + ".exp_avg", m.ToArray(), m.Shape.ToArray());
            yield return (p.Name + ".exp_avg_sq", v.ToArray(), v.Shape.ToArray());
        }
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var (p, (_, m, v)) in state)
        {
            if (read(p.Name + ".exp_avg") is { } ms && ms.Length == m.Length) m.CopyFrom(ms);
            if (read(p.Name + ".exp_avg_sq") is { } vs && vs.Length == v.Length) v.CopyFrom(vs);
        }
    }

    public override void ResetState(IEnumerable<Parameter> reset)
    {
        foreach (var p in reset)
        {
            if (state.TryGetValue(p, out var s))
            {
                p.Value.Device.Ops.Fill(s.M, 0f);
                p.Value.Device.Ops.Fill(s.V, 0f);
            }
        }
    }

    public override void Dispose()
    {
        foreach (var (mask, m, v) in state.Values)
        {
            mask.Dispose();
            m.Dispose();
            v.Dispose();
        }

        state.Clear();
    }
}

/// <summary>
/// SpIEL-style periodic drop and regrow for sparse fine-tuning at a fixed budget: after every step the gradient
/// magnitudes are accumulated; every <see cref="Every"/> steps each parameter drops the <see cref="DropFraction"/>
/// of its masked entries whose change from the start is smallest (resetting them to their starting value) and grows
/// as many new entries where the accumulated gradient is largest, so the count stays the same.
/// </summary>
public sealed class SparseRegrow
{
    private readonly MaskedAdamW optimizer;
    private readonly Dictionary<string, float[]> start;
    private readonly Dictionary<string, float[]> accumulated;

    public SparseRegrow(MaskedAdamW optimizer, int every, float dropFraction = 0.2f)
    {
        if (every <= 0) throw new ArgumentException($"regrow interval {every} must be positive");
        if (dropFraction is <= 0f or > 1f) throw new ArgumentException($"drop fraction {dropFraction} must be in (0, 1]");
        this.optimizer = optimizer;
        Every = every;
        DropFraction = dropFraction;
        start = optimizer.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        accumulated = optimizer.Parameters.ToDictionary(p => p.Name, p => new float[p.Value.Length]);
    }

    public int Every { get; }

    public float DropFraction { get; }

    /// <summary>Entries swapped so far.</summary>
    public long Regrown { get; private set; }

    /// <summary>Call after each optimizer step (the step's gradients are still in Grad).</summary>
    public void AfterStep(int step)
    {
        foreach (var p in optimizer.Parameters)
        {
            var g = p.Grad.ToArray();
            var acc = accumulated[p.Name];
            for (int i = 0; i < g.Length; i++) acc[i] += Math.Abs(g[i]);
        }

        if (step % Every != 0) return;
        var masks = optimizer.Masks;
        foreach (var p in optimizer.Parameters)
        {
            var mask = masks[p.Name];
            int drop = (int)Math.Round(DropFraction * mask.Length);
            if (drop == 0) continue;
            var w = p.Value.ToArray();
            var w0 = start[p.Name];
            var dropped = mask.OrderBy(i => Math.Abs(w[i] - w0[i])).ThenBy(i => i).Take(drop).ToHashSet();
            var inMask = mask.ToHashSet();
            var acc = accumulated[p.Name];
            var grown = Enumerable.Range(0, w.Length).Where(i => !inMask.Contains(i)).OrderByDescending(i => acc[i]).ThenBy(i => i).Take(drop).ToArray();
            foreach (int i in dropped) w[i] = w0[i];
            p.Value.CopyFrom(w);
            optimizer.Replace(p, mask.Where(i => !dropped.Contains(i)).Concat(grown).ToArray());
            Array.Clear(acc);
            Regrown += grown.Length;
        }
    }
}
