using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

public sealed class TrainingTests
{
    [TestCase("adamw", TestName = "Training_AdamW_LearnsARepeatedSequence")]
    [TestCase("sgd", TestName = "Training_SgdMomentum_LearnsARepeatedSequence")]
    public void Training_LossFalls(string optimizerName)
    {
        using var device = new CpuDevice();
        var config = LlamaConfig.Tiny with { VocabSize = 32, NumHiddenLayers = 1 };
        using var model = LlamaModel.Create(device, config, seed: 11);
        // Two sequences of a cycle: predicting the next token is learnable exactly.
        var tokens = Enumerable.Range(0, 2 * 16).Select(i => (i * 5 + i / 16) % 7).ToArray();
        var targets = tokens.Skip(1).Append(-100).ToArray();
        targets[15] = -100; // no prediction across the sequence boundary
        using Optimizer optimizer = optimizerName == "adamw" ? new AdamW(model.Parameters, weightDecay: 0f) : new Sgd(model.Parameters, momentum: 0.9f);
        float lr = optimizerName == "adamw" ? 1e-2f : 0.1f;
        double first = 0, last = 0;
        for (int step = 0; step < 40; step++)
        {
            model.ZeroGrad();
            var (loss, _) = model.Loss(tokens, targets, batch: 2, backward: true);
            device.Ops.ClipGlobalNorm(model.Parameters.Select(p => p.Grad).ToList(), 1.0);
            optimizer.Step(lr);
            if (step == 0) first = loss;
            last = loss;
        }

        Assert.That(first, Is.EqualTo(Math.Log(32)).Within(0.3), "an untrained model is near uniform");
        Assert.That(last, Is.LessThan(first * 0.5), $"loss {first:F3} -> {last:F3}");
    }

    [Test]
    public void Frozen_Parameters_AreNotUpdated()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny with { NumHiddenLayers = 1 }, seed: 12);
        var frozen = model["model.embed_tokens.weight"];
        frozen.Trainable = false;
        var before = frozen.Value.ToArray();
        var other = model["model.layers.0.mlp.up_proj.weight"].Value.ToArray();
        using var opt = new AdamW(model.Parameters);
        model.ZeroGrad();
        model.Loss(new[] { 1, 2, 3, 4 }, new[] { 2, 3, 4, 5 }, batch: 1, backward: true);
        opt.Step(1e-2f);
        Assert.That(frozen.Value.ToArray(), Is.EqualTo(before));
        Assert.That(model["model.layers.0.mlp.up_proj.weight"].Value.ToArray(), Is.Not.EqualTo(other));
    }

    [Test]
    public void WarmupCosine_Schedule_HasTheRightShape()
    {
        var s = new LearningRateSchedule.Warmup(1e-3f, WarmupSteps: 10, TotalSteps: 110, Cosine: true, MinLearningRate: 1e-4f);
        Assert.That(s.At(0), Is.EqualTo(1e-4f).Within(1e-9));
        Assert.That(s.At(9), Is.EqualTo(1e-3f).Within(1e-9));
        Assert.That(s.At(60), Is.EqualTo(5.5e-4f).Within(1e-7));
        Assert.That(s.At(110), Is.EqualTo(1e-4f).Within(1e-9));
        var lin = new LearningRateSchedule.Warmup(1f, 0, 100, Cosine: false);
        Assert.That(lin.At(25), Is.EqualTo(0.75f).Within(1e-6));
    }
}
