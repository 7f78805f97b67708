using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

public sealed class EvaluatorTests
{
    /// <summary>
    /// Several variants scored in one mixed batch give each variant's own numbers: the base row equals the plain
    /// evaluation, the LoRA row equals evaluating the model with the adapter merged (fp32 rounding of the merge and of
    /// the batched sums only: relative 1e-4 on a mean loss near ln 259), on examples of different lengths.
    /// </summary>
    [Test]
    public void EvaluateVariants_EachRowEqualsThatVariantAlone()
    {
        using var device = new CpuDevice();
        var config = LlamaConfig.Tiny;
        using var model = LlamaModel.Create(device, config, seed: 21);
        var adapter = ServingTests.Adapter(config, 4, new[] { "q_proj", "v_proj", "down_proj" }, 300, scaleB: 0.5f);
        var examples = TaskSuite.Stream(new[] { "reverse", "add", "sort" }, 9, Split.HeldOut).Take(7).ToList();
        using var set = new VariantSet(model);
        set.AddLora("ada", adapter);
        var both = Evaluator.EvaluateVariants(model, set, new[] { null, "ada" }, examples, seqLen: 40, rowsPerBatch: 5);
        var alone = Evaluator.Evaluate(model, examples, 40);
        Assert.That(both[0].Loss, Is.EqualTo(alone.Loss).Within(1e-4 * alone.Loss), "base row");
        var record = LoraMerge.Merge(model, adapter);
        var merged = Evaluator.Evaluate(model, examples, 40);
        LoraMerge.Unmerge(model, adapter, record);
        Assert.That(both[1].Loss, Is.EqualTo(merged.Loss).Within(1e-4 * merged.Loss), "adapter row");
        Assert.That(Math.Abs(both[1].Loss - both[0].Loss), Is.GreaterThan(1e-3), "the adapter changes the loss, so the rows can be told apart");
        Assert.That(both.Select(r => (r.Examples, r.Matched)), Is.All.EqualTo((7, 7)));

        // Document windows are scored on every token and not exact-matched.
        var windows = DataFiles.Windows(new[] { new Example(DataFiles.TextTask, "", "a document longer than one window of sixteen tokens") }, model.Tokenizer, 16);
        var text = Evaluator.EvaluateVariants(model, set, new string?[] { "base" }, windows, 16, completionOnly: false)[0];
        Assert.That(text.Loss, Is.EqualTo(Evaluator.Evaluate(model, windows, 16, completionOnly: false).Loss).Within(1e-4 * text.Loss));
        Assert.That(text.Matched, Is.EqualTo(0));
    }

    /// <summary>
    /// Per-example losses from the mixed batch: each example's equals its evaluation alone, they average (token-weighted)
    /// to the variant's loss, and the likelihood ratio to the base is zero for an adapter that changes nothing and not
    /// for one that does.
    /// </summary>
    [Test]
    public void ExampleLosses_AndLikelihoodRatios_FromOneMixedBatch()
    {
        using var device = new CpuDevice();
        var config = LlamaConfig.Tiny;
        using var model = LlamaModel.Create(device, config, seed: 22);
        var examples = TaskSuite.Stream(new[] { "reverse", "add" }, 10, Split.HeldOut).Take(5).ToList();
        using var set = new VariantSet(model);
        var adapter = ServingTests.Adapter(config, 4, new[] { "q_proj", "v_proj" }, 40, scaleB: 0.5f);
        set.AddLora("ada", adapter);
        set.AddLora("zero", new PeftSharp.Formats.PeftLoraAdapter(adapter.Config, adapter.Modules.ToDictionary(m => m.Key, m => (m.Value.A, new float[m.Value.B.Length]))));
        var losses = Evaluator.ExampleLosses(model, set, new[] { null, "ada", "zero" }, examples, 40);
        for (int x = 0; x < examples.Count; x++)
        {
            double alone = Evaluator.Evaluate(model, new[] { examples[x] }, 40).Loss;
            Assert.That(losses[0][x], Is.EqualTo(alone).Within(1e-4 * alone), $"example {x} alone");
        }

        var counts = examples.Select(e => Batcher.Encode(new[] { e }, model.Tokenizer, 40, true).Targets.Count(t => t != Batcher.IgnoreIndex)).ToArray();
        var total = Evaluator.EvaluateVariants(model, set, new[] { null, "ada" }, examples, 40);
        Assert.That(losses[1].Select((l, x) => l * counts[x]).Sum() / counts.Sum(), Is.EqualTo(total[1].Loss).Within(1e-9), "token-weighted mean = the variant's loss");
        Assert.That(Evaluator.LikelihoodRatios(model, set, "zero", examples, 40), Is.All.EqualTo(0.0), "B = 0: the base's likelihood, ratio 0");
        Assert.That(Evaluator.LikelihoodRatios(model, set, "ada", examples, 40).Any(r => Math.Abs(r) > 1e-3), Is.True);
    }

    /// <summary>
    /// Exact match, batched through the serving path, counts the examples whose greedy completion is exactly the
    /// expected text. Every id is made a stop token, so greedy completions are empty and half the examples (those
    /// expecting "") match by construction; the batched count must equal a one-at-a-time count.
    /// </summary>
    [Test]
    public void ExactMatch_Batched_EqualsOneAtATime()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 22);
        model.StopTokens = Enumerable.Range(0, LlamaConfig.Tiny.VocabSize).ToArray();
        var examples = Enumerable.Range(0, Evaluator.ExactMatchBatch + 9).Select(i => new Example("t", $"prompt {i} ", i % 2 == 0 ? "" : "zz")).ToList();
        var r = Evaluator.Evaluate(model, examples, 40);
        int oneAtATime = examples.Count(e => Generator.Greedy(model, e.Prompt, model.Tokenizer.EncodeEnd(e.Completion).Length) == e.Completion);
        Assert.That(oneAtATime, Is.EqualTo((examples.Count + 1) / 2));
        Assert.That(r.ExactMatch, Is.EqualTo((double)oneAtATime / examples.Count).Within(1e-12));
    }
}
