using NUnit.Framework;
using PeftSharp.Compression;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// LoRD: each linear weight as rank-r factors B A. On a matrix of known singular values the factors' error is the
/// Eckart-Young bound (the dropped singular values) and at full rank the weight comes back; a weight whose factors
/// would not be smaller stays dense; the folder loads, through the ordinary model loader, as the model of B A; a
/// damaged folder is refused naming the file.
/// </summary>
public sealed class LordTests : TempDirectoryTest
{
    /// <summary>U diag(s) V^T (m, n) with U, V random orthonormal columns (Gram-Schmidt of seeded normals).</summary>
    private static float[] WithSingularValues(int m, int n, double[] s, int seed)
    {
        var rng = new Random(seed);
        double[][] Orthonormal(int rows, int cols)
        {
            var q = new double[cols][];
            for (int j = 0; j < cols; j++)
            {
                var v = Enumerable.Range(0, rows).Select(_ => rng.NextDouble() * 2 - 1).ToArray();
                for (int pass = 0; pass < 2; pass++)
                {
                    for (int k = 0; k < j; k++)
                    {
                        double d = v.Zip(q[k], (a, b) => a * b).Sum();
                        for (int i = 0; i < rows; i++) v[i] -= d * q[k][i];
                    }
                }

                double norm = Math.Sqrt(v.Sum(x => x * x));
                q[j] = v.Select(x => x / norm).ToArray();
            }

            return q;
        }

        var u = Orthonormal(m, s.Length);
        var vt = Orthonormal(n, s.Length);
        var w = new float[m * n];
        for (int i = 0; i < m; i++)
        {
            for (int j = 0; j < n; j++) w[i * n + j] = (float)Enumerable.Range(0, s.Length).Sum(k => u[k][i] * s[k] * vt[k][j]);
        }

        return w;
    }

    private static double Error(float[] w, float[] a, float[] b, int m, int n, int r)
    {
        double err = 0;
        for (int i = 0; i < m; i++)
        {
            for (int j = 0; j < n; j++)
            {
                double acc = 0;
                for (int k = 0; k < r; k++) acc += (double)b[i * r + k] * a[k * n + j];
                err += (acc - w[i * n + j]) * (acc - w[i * n + j]);
            }
        }

        return Math.Sqrt(err);
    }

    [TestCase(12, 7, 3)]
    [TestCase(7, 12, 1)]
    [TestCase(9, 9, 9)]
    public void Factor_MeetsTheEckartYoungBound(int m, int n, int r)
    {
        var s = Enumerable.Range(0, Math.Min(m, n)).Select(i => 4.0 * Math.Pow(0.6, i)).ToArray();
        var w = WithSingularValues(m, n, s, m * 31 + n);
        var (a, b) = LordModel.Factor(w, m, n, r);
        Assert.That((a.Length, b.Length), Is.EqualTo((r * n, m * r)), "A (r, in), B (out, r)");
        double bound = Math.Sqrt(s.Skip(r).Sum(x => x * x));
        // fp32 factors of an fp32 matrix of norm 5: the error sits on the bound up to the factors' rounding (about 1e-6
        // of the norm; 1e-5 allowed) and the subspace iteration's convergence (0.6^120 here, nothing).
        Assert.That(Error(w, a, b, m, n, r), Is.EqualTo(bound).Within(5e-5 + 1e-4 * bound), $"rank {r} of {m} x {n}: the dropped singular values' norm");
        Assert.Throws<ArgumentException>(() => LordModel.Factor(w, m, n, Math.Min(m, n) + 1));
    }

    [Test]
    public void RankRule_AndWhatStaysDense()
    {
        Assert.That(LordModel.RankOf(64, 172, 0.5, null), Is.EqualTo(32), "half of min(out, in)");
        Assert.That(LordModel.RankOf(64, 172, 0.01, null), Is.EqualTo(1), "at least 1");
        Assert.That(LordModel.RankOf(64, 172, null, 100), Is.EqualTo(64), "a told rank is capped at the full rank");
        Assert.That(LordModel.Saves(64, 64, 31), Is.True, "31 x 128 < 4096");
        Assert.That(LordModel.Saves(64, 64, 32), Is.False, "32 x 128 = 4096 saves nothing");
    }

    [Test]
    public void Compress_SaveAndLoad_IsTheModelOfTheFactors()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        using var model = LlamaModel.Create(device, c, 21);
        var lord = LordModel.Compress(model, rankRatio: 0.25);
        var linear = LoraAdapterConfig.LlamaLinearModules(c).ToList();
        foreach (var module in linear)
        {
            var w = model[module + ".weight"].Value;
            int r = LordModel.RankOf(w.Dim(0), w.Dim(1), 0.25, null);
            Assert.That(lord.Factors.ContainsKey(module), Is.EqualTo(LordModel.Saves(w.Dim(0), w.Dim(1), r)), $"{module}: factored exactly when that saves");
        }

        Assert.That(lord.Factors, Is.Not.Empty);
        Assert.That(lord.Parameters, Is.LessThan(model.ParameterCount));
        string dir = Path.Combine(TempDir, "lord");
        lord.Save(dir, model);
        Assert.That(File.Exists(Path.Combine(dir, HuggingFaceFolder.SingleFile)), Is.False, "no dense weights beside the factors");
        using var loaded = HuggingFaceFolder.Load(dir, device);
        foreach (var p in model.Parameters)
        {
            string module = p.Name[..^".weight".Length];
            var got = loaded[p.Name].Value.ToArray();
            if (!lord.Factors.TryGetValue(module, out var f))
            {
                Assert.That(got, Is.EqualTo(p.Value.ToArray()), $"{p.Name}: kept whole");
                continue;
            }

            // The loaded weight is B A computed in double and rounded once.
            int m = p.Value.Dim(0), n = p.Value.Dim(1);
            Assert.That(Error(got, f.A, f.B, m, n, f.Rank), Is.LessThan(1e-6 * Math.Sqrt(m * n)), $"{p.Name}: B A");
        }

        // The loader checks the factors against lord_config.json's ranks and names the file.
        string broken = Path.Combine(TempDir, "broken");
        lord.Save(broken, model);
        string cfg = Path.Combine(broken, LordModel.ConfigFile);
        string module0 = lord.Factors.Keys.First();
        File.WriteAllText(cfg, File.ReadAllText(cfg).Replace($"\"{module0}\": {lord.Factors[module0].Rank}", $"\"{module0}\": {lord.Factors[module0].Rank - 1}"));
        var e = Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(broken, device))!;
        Assert.That(e.Message, Does.Contain(LordModel.TensorFile).And.Contain(module0 + ".lord_a"));
        string truncated = Path.Combine(TempDir, "truncated");
        lord.Save(truncated, model);
        string tensors = Path.Combine(truncated, LordModel.TensorFile);
        File.WriteAllBytes(tensors, File.ReadAllBytes(tensors)[..^100]);
        Assert.That(Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(truncated, device))!.Message, Does.Contain(LordModel.TensorFile));
        HuggingFaceFolder.Save(model, truncated);
        Assert.That(Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(truncated, device))!.Message, Does.Contain("both a LoRD model"));
        Assert.Throws<ArgumentException>(() => LordModel.Compress(model, rankRatio: 0.5, rank: 2));
        Assert.Throws<ArgumentException>(() => LordModel.Compress(model, rankRatio: 1.5));
    }
}
