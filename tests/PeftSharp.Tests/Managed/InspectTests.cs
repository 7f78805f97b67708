using NUnit.Framework;
using PeftSharp.Analysis;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// `peft inspect`'s measurements against cases with known answers: a flat spectrum's effective rank is its length,
/// a rank-one one's 1; diag(1..n) has condition n; a rank-two LoRA's change has two singular values, and a large
/// rank-one change along a spread direction is an intruder that a change along the base's own top direction is not.
/// </summary>
public sealed class InspectTests
{
    [Test]
    public void EffectiveRank_Condition_KnownCases()
    {
        Assert.That(DeltaInspection.EffectiveRank(new[] { 2.0, 2, 2, 2 }), Is.EqualTo(4).Within(1e-12));
        Assert.That(DeltaInspection.EffectiveRank(new[] { 3.0, 0, 0 }), Is.EqualTo(1).Within(1e-12));
        Assert.That(DeltaInspection.EffectiveRank(new[] { 0.0, 0 }), Is.EqualTo(0));
        Assert.That(DeltaInspection.Condition(new[] { 8.0, 4, 2 }), Is.EqualTo(4));
        Assert.That(DeltaInspection.Condition(new[] { 1.0, 0 }), Is.EqualTo(double.PositiveInfinity));
    }

    [Test]
    public void Inspect_LoraChangeHasItsRank_AndASpreadLargeChangeIsAnIntruder()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        int d = c.HiddenSize, kv = c.NumKeyValueHeads * c.HeadDim;
        const string k = "model.layers.0.self_attn.k_proj.weight", q = "model.layers.0.self_attn.q_proj.weight";
        // The base's q_proj (8 x 8) is diag(1 .. 8): condition 8, singular vectors the unit axes.
        using var b = LlamaModel.FromTensors(device, c, (name, shape) => name == q
            ? Enumerable.Range(0, 64).Select(i => i % 9 == 0 ? 1f + i / 9 : 0f).ToArray()
            : TestData.Uniform(shape.Aggregate(1, (x, y) => x * y), name.Length, -0.5f, 0.5f));
        var lora = ServingTests.Adapter(c, 2, new[] { "k_proj" }, 7, scaleB: 0.5f);
        using var f = LlamaModel.FromTensors(device, c, (name, _) =>
        {
            var v = b[name].Value.ToArray();
            if (name != q) return v;
            // + 20 u u^T with u = (1, ..., 1) / sqrt(8): the fine-tuned top direction is u, |cos| <= 1/sqrt(8) with every axis.
            return v.Select((x, i) => x + 20f / 8).ToArray();
        });
        lora.MergeInto(f);
        var report = DeltaInspection.Inspect(b, f, top: 6, intruderTop: 3, threshold: 0.5).ToDictionary(t => t.Name);
        Assert.That(report[q].BaseCondition, Is.EqualTo(8).Within(1e-9), "diag(1 .. 8)");
        Assert.That(report[q].DeltaSpectrum[0], Is.EqualTo(20).Within(1e-4), "|20 u u^T| = 20");
        Assert.That(report[q].DeltaEffectiveRank, Is.EqualTo(1).Within(1e-6));
        Assert.That(report[q].IntruderSimilarities[0], Is.InRange(1 / Math.Sqrt(8), 0.5), "the top direction is near u (tilted towards the base's largest axis)");
        Assert.That(report[q].Intruders, Is.GreaterThanOrEqualTo(1));
        Assert.That(report[k].DeltaSpectrum.Skip(2), Is.All.LessThan(1e-5), "a rank-two LoRA changes k_proj by two singular values");
        Assert.That(report[k].DeltaSpectrum[1], Is.GreaterThan(1e-3));
        Assert.That(report["model.layers.1.mlp.up_proj.weight"].DeltaEffectiveRank, Is.EqualTo(0), "an untouched weight has no change");
        Assert.That(report["model.layers.1.mlp.up_proj.weight"].Intruders, Is.EqualTo(0), "nor intruders: its singular vectors are the base's");
        Assert.That(DeltaInspection.SpectraSvg(report.Values.ToList(), "t"), Does.StartWith("<svg").And.Contain("k_proj"));
    }

    /// <summary>The WiSE-FT curve's ends are the base and the fine-tune exactly; in between, the averaged weights.</summary>
    [Test]
    public void WiseFtCurve_EndsAreTheBaseAndTheFineTune()
    {
        using var device = new CpuDevice();
        var c = LlamaConfig.Tiny with { NumHiddenLayers = 1 };
        using var b = LlamaModel.Create(device, c, 3);
        using var f = BitDeltaCompressionTests.FineTuneOf(b, 4, changeNorm: true, size: 0.2f);
        var held = PeftSharp.Data.TaskSuite.Stream(new[] { "reverse" }, 5, PeftSharp.Data.Split.HeldOut).Take(6).ToList();
        var curve = PeftSharp.Merging.Interpolation.Curve(b, f, held, 40, points: 3);
        Assert.That(curve.Select(p => p.Alpha), Is.EqualTo(new[] { 0.0, 0.5, 1.0 }));
        Assert.That(curve[0].Result.Loss, Is.EqualTo(PeftSharp.Training.Evaluator.Evaluate(b, held, 40).Loss));
        Assert.That(curve[2].Result.Loss, Is.EqualTo(PeftSharp.Training.Evaluator.Evaluate(f, held, 40).Loss));
        using var mid = LlamaModel.FromTensors(device, c, (name, _) => b[name].Value.ToArray().Select((v, i) => (float)(0.5 * v + 0.5 * f[name].Value.ToArray()[i])).ToArray());
        Assert.That(curve[1].Result.Loss, Is.EqualTo(PeftSharp.Training.Evaluator.Evaluate(mid, held, 40).Loss), "alpha 0.5: the averaged weights");
        Assert.That(curve[1].Result.Loss, Is.Not.EqualTo(curve[0].Result.Loss), "the fine-tune moved the weights");
    }
}
