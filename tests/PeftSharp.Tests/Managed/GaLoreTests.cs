using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// GaLore's step written out: Adam on R = P^T G with P the gradient's top-r left singular vectors, projected back and
/// scaled; 1-D parameters take plain AdamW; the optimizer holds 2 r n floats per matrix instead of 2 m n.
/// </summary>
public sealed class GaLoreTests
{
    [Test]
    public void GaLore_FirstStep_IsThePaperUpdate_AndItsStateIsLowRank()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro with { HiddenSize = 16, IntermediateSize = 24, NumAttentionHeads = 2, NumKeyValueHeads = 2 };
        using var model = LlamaModel.FromTensors(device, c, (name, shape) =>
        {
            var v = TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length * 5 + shape[0], -0.5f, 0.5f);
            return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
        });
        model.ZeroGrad();
        model.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
        const string up = "model.layers.0.mlp.up_proj.weight", down = "model.layers.0.mlp.down_proj.weight", norm = "model.layers.0.input_layernorm.weight";
        var before = new[] { up, down }.ToDictionary(w => w, w => (W: model[w].Value.ToArray(), G: model[w].Grad.ToArray()));
        var n0 = model[norm].Value.ToArray();
        var gn = model[norm].Grad.ToArray();
        const int r = 3, seed = 7;
        const float lr = 0.01f, scale = 0.25f;
        using var opt = new GaLoreAdamW(model.AllParameters, r, updateEvery: 10, scale: scale, seed: seed);
        opt.Step(lr);

        // up_proj (24, 16) is taller than wide: R = G Q with Q its right singular vectors; down_proj (16, 24): R = P^T G.
        foreach (var w in new[] { up, down })
        {
            var (w0, g) = before[w];
            int m = model[w].Value.Dim(0), n = model[w].Value.Dim(1);
            bool left = m <= n;
            var (u, _, v) = Svd.Top(g, m, n, r, seed: unchecked(seed * 31 + 1), iterations: 8);
            var basis = left ? u : v;
            double B(int i, int j) => (float)basis[i, j]; // P is stored in fp32
            // Adam's first step: m = (1 - b1) R, v = (1 - b2) R^2, bias-corrected: N = R / (|R| + eps).
            double N(double x) => x / (Math.Abs(x) + 1e-8);
            var expected = new float[w0.Length];
            if (left)
            {
                var rr = new double[r, n];
                for (int j = 0; j < r; j++)
                for (int k = 0; k < n; k++)
                {
                    for (int i = 0; i < m; i++) rr[j, k] += B(i, j) * g[i * n + k];
                }

                for (int i = 0; i < m; i++)
                for (int k = 0; k < n; k++) expected[i * n + k] = (float)(w0[i * n + k] - lr * scale * Enumerable.Range(0, r).Sum(j => B(i, j) * N(rr[j, k])));
            }
            else
            {
                var rq = new double[m, r];
                for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++)
                {
                    for (int k = 0; k < n; k++) rq[i, j] += g[i * n + k] * B(k, j);
                }

                for (int i = 0; i < m; i++)
                for (int k = 0; k < n; k++) expected[i * n + k] = (float)(w0[i * n + k] - lr * scale * Enumerable.Range(0, r).Sum(j => N(rq[i, j]) * B(k, j)));
            }

            Check.Close(model[w].Value.ToArray(), expected, (1e-6, 1e-4), $"{w}: W - lr scale (projected Adam step)");
        }

        var plain = n0.ToArray();
        OptimizerReference.AdamW(plain, gn, new float[plain.Length], new float[plain.Length], new AdamWStep(lr, 0.9f, 0.999f, 1e-8f, 0f, 1));
        Check.Close(model[norm].Value.ToArray(), plain, (1e-6, 1e-5), "a norm weight: plain AdamW");
        Assert.That(opt.Projects(model[up]) && opt.Projects(model[down]), Is.True);
        long dense = model.AllParameters.Where(p => p.Trainable).Sum(p => 2L * p.Value.Length);
        Assert.That(opt.StateFloats, Is.LessThan(dense), "moments in the projection");
    }
}
