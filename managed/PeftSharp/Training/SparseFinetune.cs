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
