using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;

namespace PeftSharp.Training;

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
