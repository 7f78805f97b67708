using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// MeZO against its reference update: for a fixed seed, the two losses are those of copies of the model at
/// theta + eps z and theta - eps z, the step is theta - lr g z with g their difference over 2 eps, g approximates the
/// backpropagated directional derivative grad L . z, and no gradient is ever allocated.
/// </summary>
public sealed class MezoTests
{
    private static Func<string, int[], float[]> Weights => (name, shape) =>
    {
        var v = TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length * 13 + shape[0], -0.5f, 0.5f);
        return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
    };

    [Test]
    public void Mezo_MatchesItsReferenceUpdate_AndApproximatesTheDirectionalDerivative()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        int[] tokens = LoraTrainingTests.Tokens, targets = LoraTrainingTests.Targets;
        using var model = LlamaModel.FromTensors(device, c, Weights);
        foreach (var p in model.Parameters) p.Trainable = false;
        var theta = model.Parameters.Select(p => p.Value.ToArray()).ToList();
        const float eps = 1e-3f, lr = 0.05f;
        const int seed = 11;
        int stepSeed = Mezo.StepSeed(seed, 0);
        var z = model.Parameters.Select((p, k) => Mezo.Noise(stepSeed, k, p.Value.Length)).ToList();

        // The reference: the two perturbed models built apart, the update written out.
        var index = model.Parameters.Select(p => p.Name).ToList();
        double LossAt(float sign)
        {
            using var m = LlamaModel.FromTensors(device, c, (name, _) =>
            {
                int k = index.IndexOf(name);
                return theta[k].Select((v, i) => v + sign * eps * z[k][i]).ToArray();
            });
            return m.Loss(tokens, targets, 2, backward: false).Loss;
        }

        double plus = LossAt(1f), minus = LossAt(-1f), g = (plus - minus) / (2 * eps);
        using var mezo = new Mezo(model.Parameters, eps, seed);
        var (gotPlus, gotMinus) = mezo.Step(lr, () => model.Loss(tokens, targets, 2, backward: false).Loss);
        Assert.That(gotPlus, Is.EqualTo(plus), "theta + eps z, in place, is the same float arithmetic");
        Assert.That(gotMinus, Is.EqualTo(minus).Within(1e-6), "theta - eps z, reached in place from theta + eps z");
        Assert.That(mezo.LastProjectedGradient, Is.EqualTo(g).Within(2e-3 * Math.Abs(g) + 1e-4));
        for (int k = 0; k < theta.Count; k++)
        {
            var expected = theta[k].Select((v, i) => (float)(v - lr * g * z[k][i])).ToArray();
            Check.Close(model.Parameters[k].Value.ToArray(), expected, (2e-6, 1e-5), model.Parameters[k].Name);
        }

        Assert.That(model.Parameters.Any(p => p.HasGrad), Is.False, "no gradient allocated: the memory of inference");

        // g is the finite-difference estimate of grad L . z: compare with backpropagation at theta.
        using var back = LlamaModel.FromTensors(device, c, Weights);
        back.ZeroGrad();
        back.Loss(tokens, targets, 2, backward: true);
        double directional = back.Parameters.Select((p, k) => p.Grad.ToArray().Select((gr, i) => (double)gr * z[k][i]).Sum()).Sum();
        Assert.That(g, Is.EqualTo(directional).Within(0.02 * Math.Abs(directional) + 1e-3), "g = grad L . z up to O(eps^2) and float rounding");
        Assert.That(Math.Abs(directional), Is.GreaterThan(1e-2), "a direction with a real slope, so the check can fail");
    }
}
