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
    /// <summary>A (rows, cols) gradient a b^T with b (cols, r) shared: every row lies in span(b).</summary>
    private static (float[] G, double[,] B) SharedRowSpace(int rows, int cols, int r, int seed)
    {
        var a = TestData.Uniform(rows * r, seed, -1f, 1f);
        var b = TestData.Uniform(cols * r, seed + 1, -1f, 1f);
        var g = new float[rows * cols];
        for (int i = 0; i < rows; i++)
        {
            for (int j = 0; j < cols; j++) g[i * cols + j] = (float)Enumerable.Range(0, r).Sum(k => (double)a[i * r + k] * b[j * r + k]);
        }

        var bm = new double[cols, r];
        for (int j = 0; j < cols; j++)
        {
            for (int k = 0; k < r; k++) bm[j, k] = b[j * r + k];
        }

        return (g, bm);
    }

    /// <summary>|| x - Q Q^T x || / || x || for x (n, r) and Q (n, r) orthonormal columns.</summary>
    private static double OutsideSpan(double[,] x, float[] q, int n, int r)
    {
        double outside = 0, total = 0;
        for (int c = 0; c < x.GetLength(1); c++)
        {
            var coef = Enumerable.Range(0, r).Select(k => Enumerable.Range(0, n).Sum(i => q[i * r + k] * x[i, c])).ToArray();
            for (int i = 0; i < n; i++)
            {
                double res = x[i, c] - Enumerable.Range(0, r).Sum(k => q[i * r + k] * coef[k]);
                outside += res * res;
                total += x[i, c] * x[i, c];
            }
        }

        return Math.Sqrt(outside / total);
    }

    [TestCase("model.layers.0.self_attn.q_proj.weight", true)]
    [TestCase("model.layers.0.self_attn.o_proj.weight", false)]
    public void CrossHead_ProjectsTheHiddenSide_WithABasisFromAFewHeads_AndResumes(string name, bool headsOnRows)
    {
        using var device = new CpuDevice();
        const int heads = 4, d = 4, hidden = 16, r = 3;
        // q_proj (H D, Dm) shares its hidden-side (row) space across heads; o_proj (Dm, H D) its column space.
        var (g, b) = SharedRowSpace(heads * d, hidden, r, 3);
        if (!headsOnRows) g = Enumerable.Range(0, g.Length).Select(i => g[(i % (heads * d)) * hidden + i / (heads * d)]).ToArray(); // the transpose
        var w0 = TestData.Uniform(g.Length, 9, -0.5f, 0.5f);
        var shape = headsOnRows ? new[] { heads * d, hidden } : new[] { hidden, heads * d };
        Parameter Make()
        {
            var p = new Parameter(name, device.FromArray(name, w0, shape));
            p.Grad.CopyFrom(g);
            return p;
        }

        var layout = new GaLoreAdamW.HeadLayout(d, headsOnRows);
        const float lr = 0.01f, scale = 0.25f;
        using var p1 = Make();
        using var opt = new GaLoreAdamW(new[] { p1 }, r, updateEvery: 10, scale: scale, seed: 5, crossHead: _ => layout);
        opt.Step(lr);
        var q = opt.ExportState().Single(t => t.Name == name + ".galore_p");
        Assert.That(q.Shape, Is.EqualTo(new[] { hidden, r }), "the basis lies on the hidden side");
        Assert.That(OutsideSpan(b, q.Values, hidden, r), Is.LessThan(1e-4), "one head's block already spans the shared hidden-side space");
        // The first step: R = G Q (or Q^T G), N = R / (|R| + eps), W -= lr scale (N Q^T or Q N).
        var w1 = p1.Value.ToArray();
        int m = shape[0], n = shape[1];
        for (int i = 0; i < m; i++)
        {
            for (int j = 0; j < n; j++)
            {
                double step = 0;
                for (int k = 0; k < r; k++)
                {
                    double rr = headsOnRows ? Enumerable.Range(0, n).Sum(t => g[i * n + t] * (double)q.Values[t * r + k]) : Enumerable.Range(0, m).Sum(t => q.Values[t * r + k] * (double)g[t * n + j]);
                    step += rr / (Math.Abs(rr) + 1e-8) * (headsOnRows ? q.Values[j * r + k] : q.Values[i * r + k]);
                }

                Assert.That(w1[i * n + j], Is.EqualTo(w0[i * n + j] - lr * scale * step).Within(1e-6), $"W[{i}, {j}]");
            }
        }

        // A checkpoint of the cross-head state resumes: a second step from the imported state equals the uninterrupted one.
        var saved = opt.ExportState().ToDictionary(t => t.Name, t => t.Values);
        p1.Grad.CopyFrom(g.Select(v => -0.5f * v).ToArray());
        opt.Step(lr);
        using var p2 = Make();
        p2.Value.CopyFrom(w1);
        p2.Grad.CopyFrom(g.Select(v => -0.5f * v).ToArray());
        using var resumed = new GaLoreAdamW(new[] { p2 }, r, updateEvery: 10, scale: scale, seed: 5, crossHead: _ => layout);
        resumed.ImportState(k => saved.GetValueOrDefault(k), stepCount: 1);
        resumed.Step(lr);
        Assert.That(p2.Value.ToArray(), Is.EqualTo(p1.Value.ToArray()));
        Assert.That(GaLoreAdamW.CrossHead(LlamaConfig.Tiny)("model.layers.1.self_attn.o_proj.weight"), Is.EqualTo(new GaLoreAdamW.HeadLayout(16, false)));
        Assert.That(GaLoreAdamW.CrossHead(LlamaConfig.Tiny)("model.layers.1.mlp.up_proj.weight"), Is.Null);
    }
}
