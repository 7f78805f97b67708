using NUnit.Framework;
using PeftSharp.Model;

namespace PeftSharp.Tests.Managed;

/// <summary>Whole-model gradient check: analytic gradients against central differences of the loss.</summary>
internal static class ModelGradients
{
    /// <summary>
    /// h = 3e-3: at 1e-2 the truncation error through a nearly degenerate RMSNorm row reached 28% for one weight draw
    /// (it converged to the analytic value as h shrank); fp32 loss rounding at 3e-3 is about 5e-5.
    /// </summary>
    private const double Step = 3e-3;

    /// <summary>
    /// Checks <paramref name="samples"/> random entries of each parameter against (L(w + h) - L(w - h)) / 2h, after the
    /// caller ran one backward pass into zeroed gradients. Returns the number of entries checked. With
    /// <paramref name="training"/>, the loss is evaluated in training mode (LoRA dropout on, same masks as the
    /// caller's pass as long as DropoutSeed is unchanged).
    /// </summary>
    public static int Check(LlamaModel model, IEnumerable<Parameter> parameters, int[] tokens, int[] targets, int batch, int samples, bool training = false)
    {
        int count = 0;
        var list = parameters.ToList();
        var grads = list.ToDictionary(p => p, p => p.Grad.ToArray()); // read before a training-mode loss adds to them
        foreach (var p in list)
        {
            var values = p.Value.ToArray();
            var grad = grads[p];
            var rng = new Random(p.Name.Length);
            for (int s = 0; s < samples; s++)
            {
                int i = rng.Next(values.Length);
                var plus = (float[])values.Clone();
                plus[i] += (float)Step;
                p.Value.CopyFrom(plus);
                double lp = model.Loss(tokens, targets, batch, backward: training).Loss;
                var minus = (float[])values.Clone();
                minus[i] -= (float)Step;
                p.Value.CopyFrom(minus);
                double lm = model.Loss(tokens, targets, batch, backward: training).Loss;
                p.Value.CopyFrom(values);
                double numeric = (lp - lm) / ((double)plus[i] - minus[i]);
                Assert.That(grad[i], Is.EqualTo(numeric).Within(3e-4 + 3e-2 * Math.Abs(numeric)), $"{p.Name}[{i}]");
                count++;
            }
        }

        return count;
    }
}
