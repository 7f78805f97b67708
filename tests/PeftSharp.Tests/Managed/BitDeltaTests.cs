using NUnit.Framework;
using PeftSharp.Compression;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

public sealed class BitDeltaCompressionTests : TempDirectoryTest
{
    internal static readonly LlamaConfig Small = LlamaConfig.Tiny with { HiddenSize = 32, IntermediateSize = 40, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 37 };

    /// <summary>A "fine-tune": the base plus noise whose size differs row by row on every linear weight (and, when asked, a changed norm).</summary>
    internal static LlamaModel FineTuneOf(LlamaModel b, int seed, bool changeNorm = false, float size = 0.02f)
    {
        var linear = LoraAdapterConfig.LlamaLinearModules(b.Config).Select(m => m + ".weight").ToHashSet();
        return LlamaModel.FromTensors(b.Device, b.Config, (name, shape) =>
        {
            var v = b[name].Value.ToArray();
            if (linear.Contains(name))
            {
                var noise = TestData.Uniform(v.Length, seed++, -size, size);
                for (int i = 0; i < v.Length; i++) v[i] += noise[i] * (1 + (i / shape[1]) % 3);
            }
            else if (changeNorm && name == "model.norm.weight")
            {
                v[0] += 0.5f;
            }

            return v;
        });
    }

    private static double Error(float[] delta, float scale)
    {
        double e = 0;
        foreach (float d in delta) e += Math.Pow(d - (d > 0 ? scale : -scale), 2);
        return e;
    }

    [Test]
    public void Compress_ScaleIsMeanAbsDelta_WhichIsTheLeastSquaresScale_AndRoundsShrinkTheError()
    {
        using var device = new CpuDevice();
        using var b = LlamaModel.Create(device, Small, 1);
        using var f = FineTuneOf(b, 50);
        const string m = "model.layers.1.mlp.down_proj";
        var delta = f[m + ".weight"].Value.ToArray().Zip(b[m + ".weight"].Value.ToArray(), (x, y) => x - y).ToArray();
        var one = BitDelta.Compress(b, f, rounds: 1);
        float scale = one.Modules[m].Scales[0];
        Assert.That(scale, Is.EqualTo(delta.Average(d => Math.Abs((double)d))).Within(1e-6));
        foreach (double factor in new[] { 0.5, 0.9, 0.99, 1.01, 1.1, 2.0 })
        {
            Assert.That(Error(delta, scale), Is.LessThan(Error(delta, (float)(scale * factor))), $"mean |delta| beats {factor} x it");
        }

        Assert.That(one.Dense, Is.Empty, "only linear weights changed");
        double previous = double.MaxValue;
        for (int rounds = 1; rounds <= 3; rounds++)
        {
            using var merged = LlamaModel.FromTensors(device, Small, (name, _) => b[name].Value.ToArray());
            BitDelta.Compress(b, f, rounds).MergeInto(merged);
            double err = merged[m + ".weight"].Value.ToArray().Zip(f[m + ".weight"].Value.ToArray(), (x, y) => Math.Pow(x - y, 2)).Sum();
            Assert.That(err, Is.LessThan(previous), $"{rounds} rounds");
            previous = err;
        }
    }

    [Test]
    public void MergeInto_EqualsBasePlusScaledSigns_DenseParametersCopied()
    {
        using var device = new CpuDevice();
        using var b = LlamaModel.Create(device, Small, 2);
        using var f = FineTuneOf(b, 60, changeNorm: true);
        var delta = BitDelta.Compress(b, f, rounds: 2);
        Assert.That(delta.Dense.Keys, Is.EquivalentTo(new[] { "model.norm.weight" }));
        using var merged = LlamaModel.FromTensors(device, Small, (name, _) => b[name].Value.ToArray());
        delta.MergeInto(merged);
        const string m = "model.layers.0.self_attn.k_proj";
        var (n, k) = PeftLoraAdapter.LinearShape(Small, m);
        var expected = b[m + ".weight"].Value.ToArray();
        foreach (var (signs, scale) in delta.Modules[m].Signs.Zip(delta.Modules[m].Scales)) BitDeltaReference.Decode(signs, scale, 1f, expected, n, k);
        Check.Close(merged[m + ".weight"].Value.ToArray(), expected, (1e-7, 1e-6), "merged weight");
        Assert.That(merged["model.norm.weight"].Value.ToArray(), Is.EqualTo(f["model.norm.weight"].Value.ToArray()));
    }

    [Test]
    public void Folder_RoundTripIsExact_WrongBaseAndBadTensorsAreRejected()
    {
        using var device = new CpuDevice();
        using var b = LlamaModel.Create(device, Small, 3);
        using var f = FineTuneOf(b, 70, changeNorm: true);
        var delta = BitDelta.Compress(b, f, rounds: 2);
        string dir = Path.Combine(TempDir, "delta");
        delta.Save(dir, Small);
        var back = BitDelta.Load(dir, b);
        Assert.That(back.Modules.Keys, Is.EquivalentTo(delta.Modules.Keys));
        foreach (var (m, d) in delta.Modules)
        {
            Assert.That(back.Modules[m].Scales, Is.EqualTo(d.Scales), m);
            for (int r = 0; r < d.Rounds; r++) Assert.That(back.Modules[m].Signs[r], Is.EqualTo(d.Signs[r]), $"{m} round {r}");
        }

        Assert.That(back.Dense["model.norm.weight"], Is.EqualTo(delta.Dense["model.norm.weight"]));
        Assert.That(back.BaseFingerprint, Is.EqualTo(BitDelta.Fingerprint(b)));

        using var other = LlamaModel.Create(device, Small, 4);
        var e = Assert.Throws<PeftSharpInputException>(() => BitDelta.Load(dir, other))!;
        Assert.That(e.Message, Does.Contain("only applies to its own base"));

        // A signs tensor of the wrong width, written by hand beside valid ones, is named.
        string bad = Path.Combine(TempDir, "bad");
        Directory.CreateDirectory(bad);
        File.Copy(Path.Combine(dir, BitDelta.ConfigFile), Path.Combine(bad, BitDelta.ConfigFile));
        SafeTensorsWriter.Write(Path.Combine(bad, BitDelta.WeightsFile), new[]
        {
            SafeTensorData.Int32("model.layers.0.self_attn.q_proj.weight.signs", new int[5 * 32], new[] { 1, 32, 5 }),
            new SafeTensorData("model.layers.0.self_attn.q_proj.weight.scales", new[] { 1f }, new[] { 1 }),
            new SafeTensorData("model.layers.9.mlp.up_proj.weight", new[] { 1f }, new[] { 1 }),
        });
        e = Assert.Throws<PeftSharpInputException>(() => BitDelta.Load(bad, b))!;
        Assert.That(e.Message, Does.Contain("q_proj.weight.signs is I32 [1, 32, 5], expected I32 [rounds, 32, 1]").And.Contain("model.layers.9.mlp.up_proj.weight matches no parameter"));
    }

    [Test]
    public void ScaleDistillation_LowersTheLogitError_ZeroStepsKeepsTheScales()
    {
        using var device = new CpuDevice();
        using var b = LlamaModel.Create(device, Small, 5);
        using var f = FineTuneOf(b, 80);
        var delta = BitDelta.Compress(b, f);
        var batches = Enumerable.Range(0, 6).Select(i => TestData.Ints(2 * 8, 100 + i, Small.VocabSize)).ToArray();
        var none = ScaleDistillation.Run(delta, b, f, batches[..4], batches[4..], batchSize: 2, steps: 0);
        Assert.That(none.Delta, Is.SameAs(delta));
        Assert.That(none.LogitMseAfter, Is.EqualTo(none.LogitMseBefore));
        // From mean |delta| (already L2-optimal per matrix) on random deltas there is little to gain, but it must not lose.
        var report = ScaleDistillation.Run(delta, b, f, batches[..4], batches[4..], batchSize: 2, steps: 40, learningRate: 0.05f);
        TestContext.Out.WriteLine($"logit MSE {report.LogitMseBefore:E3} -> {report.LogitMseAfter:E3}");
        Assert.That(report.LogitMseAfter, Is.LessThan(report.LogitMseBefore), "distillation lowers the held-out logit error");
        Assert.That(report.Delta.Modules.Values.Zip(delta.Modules.Values).Any(p => p.First.Scales[0] != p.Second.Scales[0]), "scales moved");
        // From scales a third of their size the gradient has far to go: the sign matrices' own error (the floor reached
        // from mean |delta|) stays, so what must close is the gap above that floor, by at least 80%.
        var shrunk = new BitDelta(delta.Modules.ToDictionary(m => m.Key, m => new BitDeltaModule(m.Value.Signs, m.Value.Scales.Select(x => x / 3).ToArray())), delta.Dense, delta.BaseFingerprint);
        var recovered = ScaleDistillation.Run(shrunk, b, f, batches[..4], batches[4..], batchSize: 2, steps: 40, learningRate: 0.05f);
        TestContext.Out.WriteLine($"logit MSE from shrunk scales {recovered.LogitMseBefore:E3} -> {recovered.LogitMseAfter:E3}");
        double floor = report.LogitMseAfter;
        Assert.That(recovered.LogitMseAfter - floor, Is.LessThan(0.2 * (recovered.LogitMseBefore - floor)));
        Assert.That(report.Delta.Modules.Values.Zip(delta.Modules.Values).All(p => ReferenceEquals(p.First.Signs, p.Second.Signs)), "signs untouched");
    }
}
