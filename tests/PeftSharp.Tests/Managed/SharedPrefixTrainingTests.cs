using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>Prefix Grouper (one prompt, many completions) and prefix tuning, through the shared-prefix kernels.</summary>
public sealed class SharedPrefixTrainingTests
{
    private static readonly LlamaConfig Micro = LoraTrainingTests.Micro;

    private static LlamaModel UnitModel(CpuDevice device, int seed) => LlamaModel.FromTensors(device, Micro, (name, shape) =>
    {
        int n = shape.Aggregate(1, (a, b) => a * b);
        var v = TestData.Uniform(n, (name.Aggregate(17, (h, c) => unchecked(h * 31 + c)) & 0x7fff) + seed, -0.5f, 0.5f);
        return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
    });

    [TestCase(4, new[] { 3, 3, 3 }, TestName = "GroupedLoss_EqualsThePromptCopiedPerCompletion_LossAndEveryGradient_P4_G3")]
    [TestCase(1, new[] { 2, 4 }, TestName = "GroupedLoss_EqualsThePromptCopiedPerCompletion_LossAndEveryGradient_P1_RaggedCompletions")]
    public void GroupedLoss_EqualsCopied(int promptLength, int[] completionLengths)
    {
        using var device = new CpuDevice();
        using var grouped = UnitModel(device, 1);
        using var copied = UnitModel(device, 1);
        var prompt = TestData.Ints(promptLength, 3, Micro.VocabSize);
        var completions = completionLengths.Select((len, j) => TestData.Ints(len, 10 + j, Micro.VocabSize)).ToArray();
        const int pad = 0;
        grouped.ZeroGrad();
        var (gl, gc) = grouped.GroupedLoss(prompt, completions, backward: true, pad);

        // The same thing the long way: G rows of [prompt, completion, padding], loss on completion tokens only.
        int len = completionLengths.Max(), t = promptLength + len;
        var tokens = new int[completions.Length * t];
        var targets = Enumerable.Repeat(-100, tokens.Length).ToArray();
        for (int j = 0; j < completions.Length; j++)
        {
            prompt.CopyTo(tokens, j * t);
            for (int r = 0; r < len; r++) tokens[j * t + promptLength + r] = r < completions[j].Length ? completions[j][r] : pad;
            for (int r = 0; r < completions[j].Length; r++) targets[j * t + promptLength - 1 + r] = completions[j][r];
        }

        copied.ZeroGrad();
        var (cl, cc) = copied.Loss(tokens, targets, completions.Length, backward: true);
        Assert.That(gc, Is.EqualTo(cc));
        Assert.That(gl, Is.EqualTo(cl).Within(1e-5 * Math.Abs(cl)), "loss");
        foreach (var p in copied.Parameters)
        {
            // Sums over the G copies in one, over the G completions' reads of one shared copy in the other: rounding only.
            Check.Close(grouped[p.Name].Grad.ToArray(), p.Grad.ToArray(), (2e-6, 1e-4), $"gradient of {p.Name}");
        }
    }

    [Test]
    public void PrefixTuning_GradientsMatchFiniteDifferences_AndDecodingWithTheCacheEqualsTheFullPass()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device, 2);
        model.AddPrefixTuning(tokens: 3, seed: 4);
        Assert.That(model.Parameters.All(p => !p.Trainable), "the base freezes");
        model["model.embed_tokens.weight"].Trainable = true; // checks the input path through the prefix attention too
        var tokens = LoraTrainingTests.Tokens;
        var targets = LoraTrainingTests.Targets;
        model.ZeroGrad();
        model.Loss(tokens, targets, 2, backward: true);
        var checkedParams = model.Prefix!.Parameters.Append(model["model.embed_tokens.weight"]).ToList();
        Assert.That(ModelGradients.Check(model, checkedParams, tokens, targets, batch: 2, samples: 3), Is.EqualTo(3 * checkedParams.Count));

        var full = model.Logits(tokens, batch: 1);
        using var cache = new KvCache(model, 8);
        var step = model.DecodeStep(cache, tokens[..2]);
        Check.Close(step, full.AsSpan(1 * Micro.VocabSize, Micro.VocabSize), (2e-5, 2e-4), "prefill behind the virtual tokens");
        for (int i = 2; i < tokens.Length; i++)
        {
            step = model.DecodeStep(cache, new[] { tokens[i] });
            Check.Close(step, full.AsSpan(i * Micro.VocabSize, Micro.VocabSize), (2e-5, 2e-4), $"position {i}");
        }
    }
}
