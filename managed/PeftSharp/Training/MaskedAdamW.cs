using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;

namespace PeftSharp.Training;

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
            foreach (var (suffix, t) in new[] { (".exp_avg", m), (".exp_avg_sq", v) })
            {
                if (read(p.Name + suffix) is not { } values) continue;
                if (values.Length != t.Length) throw new PeftSharpInputException($"{p.Name}{suffix}: the checkpoint holds {values.Length} values, the mask has {t.Length} entries (was the " +
                    $"mask restored first?)");
                t.CopyFrom(values);
            }
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
