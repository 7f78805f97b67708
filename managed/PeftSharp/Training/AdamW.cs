using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// torch.optim.AdamW: decoupled weight decay and bias-corrected moments. Parameters for which
/// <see cref="DecayFilter"/> says false get no decay (by default: norm weights, as Hugging Face's Trainer does).
/// </summary>
public sealed class AdamW : Optimizer
{
    private readonly Dictionary<Parameter, (Tensor M, Tensor V)> state = new();

    public AdamW(IEnumerable<Parameter> parameters, float beta1 = 0.9f, float beta2 = 0.999f, float epsilon = 1e-8f, float weightDecay = 0.01f)
        : base(parameters)
    {
        if (beta1 is < 0 or >= 1 || beta2 is < 0 or >= 1) throw new ArgumentException($"adamw: betas ({beta1}, {beta2}) must be in [0, 1)");
        Beta1 = beta1;
        Beta2 = beta2;
        Epsilon = epsilon;
        WeightDecay = weightDecay;
    }

    public float Beta1 { get; }
    public float Beta2 { get; }
    public float Epsilon { get; }
    public float WeightDecay { get; }

    public Func<string, bool> DecayFilter { get; init; } = name => !name.EndsWith("norm.weight", StringComparison.Ordinal);

    public override void Step(float learningRate)
    {
        StepCount++;
        foreach (var p in Parameters)
        {
            if (!p.Trainable) continue;
            if (!state.TryGetValue(p, out var s))
            {
                var shape = p.Value.Shape.ToArray();
                s = (p.Value.Device.Zeros(p.Name + ".exp_avg", shape), p.Value.Device.Zeros(p.Name + ".exp_avg_sq", shape));
                state[p] = s;
            }

            float decay = DecayFilter(p.Name) ? WeightDecay : 0f;
            p.Value.Device.Ops.AdamW(p.Value, p.Grad, s.M, s.V, new AdamWStep(learningRate * LearningRateScale(p.Name), Beta1, Beta2, Epsilon, decay, StepCount));
        }
    }

    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState()
    {
        return state.SelectMany(kv => Moments(kv.Key.Name, kv.Value.M, kv.Value.V));
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var p in Parameters)
        {
            var (m, v) = ReadMoments(read, p.Name);
            if (m == null || v == null) continue;
            var shape = p.Value.Shape.ToArray();
            state[p] = (p.Value.Device.FromArray(p.Name + ".exp_avg", m, shape), p.Value.Device.FromArray(p.Name + ".exp_avg_sq", v, shape));
        }
    }

    public override void ResetState(IEnumerable<Parameter> reset)
    {
        foreach (var p in reset)
        {
            if (state.Remove(p, out var s))
            {
                s.M.Dispose();
                s.V.Dispose();
            }
        }
    }

    public override void Dispose()
    {
        foreach (var (m, v) in state.Values)
        {
            m.Dispose();
            v.Dispose();
        }

        state.Clear();
    }
}
