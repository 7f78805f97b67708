using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// Decoding from a weighted sum of logits: contrastive generation (fine-tune against base, both rows in one mixed
/// batch) and proxy-tuning (a large model steered by a small tuned/untuned pair) each give, token for token, what the
/// plain reference gives: every term's model run alone over the whole sequence so far, the logits summed in double,
/// the argmax appended.
/// </summary>
public sealed class LogitArithmeticTests
{
    /// <summary>The greedy reference: at each step every (model, weight) scored alone over the sequence so far.</summary>
    private static string Reference(IReadOnlyList<(LlamaModel Model, double Weight)> terms, string prompt, int maxTokens)
    {
        var tok = terms[0].Model.Tokenizer;
        var seq = tok.EncodeStart(prompt);
        var output = new List<int>();
        while (output.Count < maxTokens)
        {
            var sum = new double[terms[0].Model.Config.VocabSize];
            foreach (var (model, w) in terms)
            {
                var l = MixedBatch.Alone(model, seq.ToArray());
                for (int v = 0; v < sum.Length; v++) sum[v] += w * l[v];
            }

            int best = 0;
            for (int v = 1; v < sum.Length; v++) best = sum[v] > sum[best] ? v : best;
            if (best == tok.Eos) break;
            output.Add(best);
            seq.Add(best);
        }

        return tok.Decode(output);
    }

    /// <summary>A unit-scale tiny model, a rank-4 LoRA of it as variant "fine" of a set, and a copy with the LoRA merged.</summary>
    private sealed class WithFineTune : IDisposable
    {
        public WithFineTune(PeftSharp.Engine.Device device, int salt, int adapterSeed)
        {
            Model = ServingTests.UnitScaleTiny(device, salt);
            var adapter = ServingTests.Adapter(Model.Config, 4, LoraAdapterConfig.LlamaLinear, adapterSeed, scaleB: 0.5f);
            Set = new VariantSet(Model);
            Set.AddLora("fine", adapter);
            Merged = LlamaModel.FromTensors(device, Model.Config, (name, _) => Model[name].Value.ToArray());
            LoraMerge.Merge(Merged, adapter);
        }

        public LlamaModel Model { get; }

        public VariantSet Set { get; }

        public LlamaModel Merged { get; }

        public void Dispose()
        {
            Set.Dispose();
            Model.Dispose();
            Merged.Dispose();
        }
    }

    private static readonly GenerationRequest[] Requests = { new("abc", MaxTokens: 8), new("hello", MaxTokens: 5), new("x", MaxTokens: 0) };

    [Test]
    public void Contrastive_FineAgainstBase_InOneMixedBatch_EqualsTheReference()
    {
        using var device = new CpuDevice();
        using var f = new WithFineTune(device, 3, 40);
        var (model, set, merged) = (f.Model, f.Set, f.Merged);
        const float alpha = 1.5f;
        var got = LogitArithmetic.Generate(LogitArithmetic.Contrastive(set, "fine", alpha), Requests).Select(r => r.Completion).ToList();
        var want = Requests.Select(r => Reference(new[] { (merged, 1.0 + alpha), (model, -(double)alpha) }, r.Prompt, r.MaxTokens)).ToList();
        Assert.That(got, Is.EqualTo(want));
        // alpha 0 is the fine-tune alone, and the contrast must change something or this test could not fail.
        var plain = LogitArithmetic.Generate(LogitArithmetic.Contrastive(set, "fine", 0f), Requests).Select(r => r.Completion).ToList();
        var alone = BatchGenerator.Generate(model, Requests.Select(r => r with { Variant = "fine" }).ToList(), set).Select(r => r.Completion).ToList();
        Assert.That(plain, Is.EqualTo(alone));
        Assert.That(got, Is.Not.EqualTo(plain), "the contrast changes the tokens");
        Assert.That(got[2], Is.Empty, "no tokens asked, none given");
    }

    [Test]
    public void ProxyTuning_LargeSteeredBySmallPair_EqualsTheReference_WithTheExpertAsVariantOrAsModel()
    {
        using var device = new CpuDevice();
        using var large = ServingTests.UnitScaleTiny(device, 5);
        using var f = new WithFineTune(device, 7, 80);
        var (small, set, tuned) = (f.Model, f.Set, f.Merged);
        var want = Requests.Select(r => Reference(new[] { (large, 1.0), (tuned, 1.0), (small, -1.0) }, r.Prompt, r.MaxTokens)).ToList();
        var asVariant = LogitArithmetic.Generate(LogitArithmetic.ProxyTuning(large, small, 1f, set, "fine"), Requests).Select(r => r.Completion).ToList();
        var asModel = LogitArithmetic.Generate(LogitArithmetic.ProxyTuning(large, small, 1f, expertModel: tuned), Requests).Select(r => r.Completion).ToList();
        Assert.That(asVariant, Is.EqualTo(want));
        Assert.That(asModel, Is.EqualTo(want));
        var largeAlone = Requests.Select(r => Generator.Greedy(large, r.Prompt, r.MaxTokens)).ToList();
        Assert.That(want, Is.Not.EqualTo(largeAlone), "the small pair steers the large model");
    }

    [Test]
    public void CombinedLoss_IsTheCrossEntropyOfTheSummedLogits_AndOneTermIsThePlainEvaluation()
    {
        using var device = new CpuDevice();
        using var f = new WithFineTune(device, 3, 40);
        var (model, set, merged) = (f.Model, f.Set, f.Merged);
        var examples = TaskSuite.Stream(new[] { "reverse", "add" }, 4, Split.HeldOut).Take(5).ToList();
        const int seqLen = 24;
        // Reference: each model's full forward, the logits combined and the completion targets scored in double.
        var (ids, targets) = Batcher.Encode(examples, model.Tokenizer, seqLen, completionOnly: true);
        var lf = merged.Logits(ids, examples.Count);
        var lb = model.Logits(ids, examples.Count);
        int vocab = model.Config.VocabSize, counted = 0;
        double sum = 0;
        for (int i = 0; i < ids.Length; i++)
        {
            if (targets[i] < 0) continue;
            var row = Enumerable.Range(0, vocab).Select(v => 1.5 * lf[i * vocab + v] - 0.5 * lb[i * vocab + v]).ToArray();
            double max = row.Max();
            sum += max + Math.Log(row.Sum(v => Math.Exp(v - max))) - row[targets[i]];
            counted++;
        }

        var got = Evaluator.EvaluateCombined(LogitArithmetic.Contrastive(set, "fine", 0.5f), examples, seqLen);
        // Mixed-batch rows against full forwards: the step tolerance of the serving tests, on a loss of a few nats.
        Assert.That(got.Loss, Is.EqualTo(sum / counted).Within(1e-4));
        var plain = Evaluator.Evaluate(model, examples, seqLen);
        var one = Evaluator.EvaluateCombined(new[] { new LogitTerm(model, 1f) }, examples, seqLen);
        Assert.That((one.Loss, one.ExactMatch, one.Matched), Is.EqualTo((plain.Loss, plain.ExactMatch, plain.Matched)).Using<(double, double, int)>((a, b) =>
            Math.Abs(a.Item1 - b.Item1) < 1e-4 && a.Item2 == b.Item2 && a.Item3 == b.Item3));
        Assert.That(got.Loss, Is.Not.EqualTo(plain.Loss).Within(1e-3), "the fine-tune's contrast scores otherwise than the base");
    }

    [Test]
    public void BadTermsAndRequests_AreRefusedByName()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 3);
        using var other = LlamaModel.Create(device, LlamaConfig.Tiny with { VocabSize = 300 }, 1);
        using var set = new VariantSet(model);
        set.AddLora("fine", ServingTests.Adapter(model.Config, 2, LoraAdapterConfig.LlamaLinear, 1));
        var terms = LogitArithmetic.Contrastive(set, "fine", 1f);
        Assert.That(Assert.Throws<ArgumentException>(() => LogitArithmetic.Generate(terms, new[] { new GenerationRequest("a", "fine") }))!.Message, Does.Contain("terms choose the variants"));
        Assert.That(Assert.Throws<ArgumentException>(() => LogitArithmetic.Generate(new[] { new LogitTerm(model, 1f), new LogitTerm(other, 1f) }, Requests))!.Message,
            Does.Contain("vocabulary has 300 tokens"));
        Assert.That(Assert.Throws<ArgumentException>(() => LogitArithmetic.Generate(LogitArithmetic.Contrastive(set, "nope", 1f), Requests))!.Message, Does.Contain("nope"));
        Assert.Throws<ArgumentException>(() => LogitArithmetic.ProxyTuning(model, model));
    }
}
