using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

public sealed class LoraTrainingTests : TempDirectoryTest
{
    internal static readonly LlamaConfig Micro = new()
    {
        HiddenSize = 8, IntermediateSize = 11, NumAttentionHeads = 2, NumKeyValueHeads = 1, NumHiddenLayers = 2,
        VocabSize = 13, RmsNormEps = 1e-5f, MaxPositionEmbeddings = 16, TieWordEmbeddings = false,
    };

    internal static readonly int[] Tokens = { 1, 5, 12, 0, 7, 7 };
    internal static readonly int[] Targets = { 5, 12, 3, 7, -100, 9 };

    [Test]
    public void LoraGradients_MatchFiniteDifferences_ThroughEveryProjection()
    {
        using var device = new CpuDevice();
        // Base weights in +-0.5 (norms near 1): with the 0.02 init attention is nearly uniform and the key path's
        // gradients fall below the tolerance, so a wrong key gradient went unnoticed (checked by mutation).
        using var model = LlamaModel.FromTensors(device, Micro, (name, shape) =>
        {
            int n = shape.Aggregate(1, (a, b) => a * b);
            var v = TestData.Uniform(n, name.Aggregate(17, (h, c) => unchecked(h * 31 + c)) & 0x7fff, -0.5f, 0.5f);
            return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
        });
        model.AddLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear" }, seed: 4);
        // B starts at 0 (so A would get no gradient): give every B values to check both matrices.
        foreach (var l in model.Lora.Values) l.B.Value.CopyFrom(TestData.Uniform(l.B.Value.Length, l.B.Value.Length, -0.5f, 0.5f));
        // The embedding trains too, so the input-gradient path through the LoRA branch is checked as well.
        model["model.embed_tokens.weight"].Trainable = true;
        model.ZeroGrad();
        model.Loss(Tokens, Targets, 2, backward: true);
        var trainable = model.AllParameters.Where(p => p.Trainable).ToList();
        Assert.That(ModelGradients.Check(model, trainable, Tokens, Targets, batch: 2, samples: 3), Is.EqualTo(3 * trainable.Count));

        Assert.That(model["model.layers.0.mlp.up_proj.weight"].Grad.ToArray(), Is.All.EqualTo(0f), "frozen base weights get no gradient");
    }

    /// <summary>
    /// Also with LoRA on some layers only: the inference forward adds o_proj and down_proj into the residual stream in
    /// place where a layer has neither adapted, and keeps separate sums where it has one, so a model can switch between
    /// the two from layer to layer.
    /// </summary>
    [TestCase("q_proj,v_proj,down_proj", null)]
    [TestCase("o_proj", 0)]
    [TestCase("down_proj", 1)]
    public void LoraWithZeroB_LeavesLogitsUnchanged_AndMergedEqualsUnmergedForward(string targets, int? onlyLayer)
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, Micro, 5);
        var before = model.Logits(Tokens, 2);
        var config = new LoraAdapterConfig
        {
            R = 3, LoraAlpha = 6, TargetModules = targets.Split(','), LayersToTransform = onlyLayer is int layer ? new[] { layer } : null,
        };
        model.AddLora(config, seed: 6);
        Assert.That(model.Logits(Tokens, 2), Is.EqualTo(before), "B = 0: LoRA changes nothing");
        foreach (var l in model.Lora.Values) l.B.Value.CopyFrom(TestData.Uniform(l.B.Value.Length, 9, -0.3f, 0.3f));
        var withLora = model.Logits(Tokens, 2);
        Assert.That(withLora, Is.Not.EqualTo(before));
        var adapter = model.ExportLora(config);
        using var merged = LlamaModel.FromTensors(device, Micro, (name, _) => model[name].Value.ToArray());
        LoraMerge.Merge(merged, adapter);
        Check.Close(merged.Logits(Tokens, 2), withLora, (2e-5, 2e-4), "merged weights vs LoRA branch");
    }

    [Test]
    public void LoraFinetune_LearnsWithTheBaseFrozen_AndSavesAPeftFolder()
    {
        using var device = new CpuDevice();
        // Base weights of unit scale: with the 0.02 init the frozen tied LM head caps logits near +-2, whatever the adapter does.
        using var model = LlamaModel.FromTensors(device, LlamaConfig.Tiny with { NumHiddenLayers = 1 }, (name, shape) =>
            name.EndsWith("norm.weight", StringComparison.Ordinal)
                ? Enumerable.Repeat(1f, shape.Aggregate(1, (a, b) => a * b)).ToArray()
                : TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length, -0.3f, 0.3f));
        var baseWeights = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        var config = new LoraAdapterConfig { R = 8, LoraAlpha = 16, TargetRegex = "all-linear" };
        model.AddLora(config, seed: 8);
        using var opt = new AdamW(model.AllParameters, weightDecay: 0f);
        // A learnable target on an untrained base: the same repeated sequence as the full fine-tuning test.
        var tokens = Enumerable.Range(0, 2 * 16).Select(i => (i * 5 + i / 16) % 7).ToArray();
        var targets = tokens.Skip(1).Append(-100).ToArray();
        targets[15] = -100;
        double first = 0, last = 0;
        for (int step = 0; step < 100; step++)
        {
            model.ZeroGrad();
            var (loss, _) = model.Loss(tokens, targets, batch: 2, backward: true);
            opt.Step(3e-2f);
            if (step == 0) first = loss;
            last = loss;
        }

        Assert.That(last, Is.LessThan(first * 0.5), $"loss {first:F3} -> {last:F3}");
        foreach (var p in model.Parameters) Assert.That(p.Value.ToArray(), Is.EqualTo(baseWeights[p.Name]), $"{p.Name} is frozen");
        long trainable = model.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        Assert.That(trainable, Is.LessThan(model.ParameterCount / 2));
        model.ExportLora(config).Save(TempDir, model.Config);
        var back = PeftLoraAdapter.Load(TempDir, model.Config);
        Assert.That(back.Modules, Has.Count.EqualTo(7));
    }
}
