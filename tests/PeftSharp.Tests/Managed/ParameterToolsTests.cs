using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

public sealed class ParameterToolsTests
{
    [Test]
    public void Freeze_ByPattern_AndUnmatchedPatternErrors()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, 1);
        int n = ParameterTools.Freeze(model, new[] { "model.embed_tokens.*", "*.self_attn.?_proj.weight" });
        Assert.That(n, Is.EqualTo(1 + 2 * 4));
        Assert.That(model["model.layers.1.self_attn.q_proj.weight"].Trainable, Is.False);
        Assert.That(model["model.layers.1.mlp.up_proj.weight"].Trainable, Is.True);
        var e = Assert.Throws<ArgumentException>(() => ParameterTools.Freeze(model, new[] { "*.mlp.*", "*.attention.*" }))!;
        Assert.That(e.Message, Does.Contain("*.attention.*").And.Not.Contain("*.mlp.*,"));
    }

    [Test]
    public void LayerDecay_ScalesByDepth()
    {
        var f = ParameterTools.LayerDecay(LlamaConfig.Tiny with { NumHiddenLayers = 3, TieWordEmbeddings = false }, 0.5f);
        Assert.That(f("model.layers.2.mlp.up_proj.weight"), Is.EqualTo(0.5f));
        Assert.That(f("model.layers.0.mlp.up_proj.weight"), Is.EqualTo(0.125f));
        Assert.That(f("model.embed_tokens.weight"), Is.EqualTo(0.0625f));
        Assert.That(f("lm_head.weight"), Is.EqualTo(1f));
        Assert.That(f("model.norm.weight"), Is.EqualTo(1f));
    }

    [Test]
    public void Ema_TracksTheWeights_AndClipPerParameterBoundsEachNorm()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny with { NumHiddenLayers = 1 }, 2);
        var p = model["model.norm.weight"];
        using var ema = new WeightEma(model, 0.5f);
        device.Ops.Fill(p.Value, 3f);
        ema.Update(); // 0.5 * 1 + 0.5 * 3
        ema.CopyToModel();
        Assert.That(p.Value.ToArray(), Is.All.EqualTo(2f));

        model.ZeroGrad();
        model.Loss(new[] { 1, 2, 3, 4 }, new[] { 2, 3, 4, 5 }, 1, backward: true);
        ParameterTools.ClipPerParameter(device.Ops, model.Parameters, 0.01);
        foreach (var q in model.Parameters) Assert.That(device.Ops.GlobalNorm(new[] { q.Grad }), Is.LessThanOrEqualTo(0.0100001), q.Name);
    }
}
