using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// Base of the optimizers: steps every trainable parameter with its accumulated gradient. State tensors live on
/// the parameters' device and are created on the first step.
/// </summary>
public abstract class Optimizer : IDisposable
{
    protected Optimizer(IEnumerable<Parameter> parameters)
    {
        Parameters = parameters.ToList();
    }

    public IReadOnlyList<Parameter> Parameters { get; }

    /// <summary>Steps taken so far.</summary>
    public int StepCount { get; protected set; }

    /// <summary>Multiplies the learning rate per parameter (layer-wise decay); 1 for all by default.</summary>
    public Func<string, float> LearningRateScale { get; init; } = _ => 1f;

    /// <summary>Applies one update at <paramref name="learningRate"/> to every trainable parameter.</summary>
    public abstract void Step(float learningRate);

    /// <summary>The optimizer's state tensors by name (for checkpoints), downloaded to the host.</summary>
    public abstract IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState();

    /// <summary>Restores state written by <see cref="ExportState"/> and the step count.</summary>
    public abstract void ImportState(Func<string, float[]?> read, int stepCount);

    /// <summary>Forgets the state of <paramref name="reset"/> (fresh moments), as a restarted adapter needs.</summary>
    public abstract void ResetState(IEnumerable<Parameter> reset);

    public virtual void Dispose()
    {
    }
}

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
        foreach (var (p, (m, v)) in state)
        {
            yield return (p.Name + ".exp_avg", m.ToArray(), m.Shape.ToArray());
            yield return (p.Name + ".exp_avg_sq", v.ToArray(), v.Shape.ToArray());
        }
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var p in Parameters)
        {
            var m = read(p.Name + ".exp_avg");
            var v = read(p.Name + ".exp_avg_sq");
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

/// <summary>torch.optim.SGD without dampening: plain, with momentum, or Nesterov; L2 weight decay.</summary>
public sealed class Sgd : Optimizer
{
    private readonly Dictionary<Parameter, Tensor> momentum = new();

    public Sgd(IEnumerable<Parameter> parameters, float momentum = 0f, bool nesterov = false, float weightDecay = 0f)
        : base(parameters)
    {
        if (nesterov && momentum == 0f) throw new ArgumentException("sgd: nesterov needs a momentum above 0");
        Momentum = momentum;
        Nesterov = nesterov;
        WeightDecay = weightDecay;
    }

    public float Momentum { get; }
    public bool Nesterov { get; }
    public float WeightDecay { get; }

    public override void Step(float learningRate)
    {
        StepCount++;
        foreach (var p in Parameters)
        {
            if (!p.Trainable) continue;
            Tensor? buf = null;
            if (Momentum != 0f && !momentum.TryGetValue(p, out buf))
            {
                buf = p.Value.Device.Zeros(p.Name + ".momentum_buffer", p.Value.Shape.ToArray());
                momentum[p] = buf;
            }

            p.Value.Device.Ops.Sgd(p.Value, p.Grad, buf, new SgdStep(learningRate * LearningRateScale(p.Name), Momentum, WeightDecay, Nesterov));
        }
    }

    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState()
    {
        foreach (var (p, b) in momentum) yield return (p.Name + ".momentum_buffer", b.ToArray(), b.Shape.ToArray());
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var p in Parameters)
        {
            if (read(p.Name + ".momentum_buffer") is { } b) momentum[p] = p.Value.Device.FromArray(p.Name + ".momentum_buffer", b, p.Value.Shape.ToArray());
        }
    }

    public override void ResetState(IEnumerable<Parameter> reset)
    {
        foreach (var p in reset)
        {
            if (momentum.Remove(p, out var b)) b.Dispose();
        }
    }

    public override void Dispose()
    {
        foreach (var t in momentum.Values) t.Dispose();
        momentum.Clear();
    }
}

/// <summary>Learning rate as a function of the (0-based) step.</summary>
public abstract record LearningRateSchedule(float PeakLearningRate)
{
    public abstract float At(int step);

    public sealed record Constant(float LearningRate) : LearningRateSchedule(LearningRate)
    {
        public override float At(int step) => PeakLearningRate;
    }

    /// <summary>Linear warmup from 0, then cosine (or linear) decay to <paramref name="MinLearningRate"/> at <paramref name="TotalSteps"/>.</summary>
    public sealed record Warmup(float LearningRate, int WarmupSteps, int TotalSteps, bool Cosine = true, float MinLearningRate = 0f)
        : LearningRateSchedule(LearningRate)
    {
        public override float At(int step)
        {
            if (step < WarmupSteps) return PeakLearningRate * (step + 1) / WarmupSteps;
            if (TotalSteps <= WarmupSteps) return PeakLearningRate;
            double progress = Math.Clamp((double)(step - WarmupSteps) / (TotalSteps - WarmupSteps), 0, 1);
            double shape = Cosine ? 0.5 * (1 + Math.Cos(Math.PI * progress)) : 1 - progress;
            return (float)(MinLearningRate + (PeakLearningRate - MinLearningRate) * shape);
        }
    }
}
