using NUnit.Framework;
using PeftSharp.Analysis;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// TuCo's decomposition is exact: the fine-tuned embedding plus every layer's PTC and FTC is the fine-tuned model's
/// last hidden state (checked through the final norm and head against the fine-tune run alone); on one layer the
/// embedding plus PTC alone is the base model's; an adapter that changes nothing scores 0; a full fine-tune (as its
/// sparse delta) scores what the same change as a LoRA variant scores.
/// </summary>
public sealed class TuningContributionTests
{
    /// <summary>Logits (V) of hidden state <paramref name="x"/> through the model's final RMSNorm and (tied) head, in double.</summary>
    private static double[] Head(LlamaModel m, double[] x)
    {
        var w = m["model.norm.weight"].Value.ToArray();
        var head = m[m.Config.TieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight"].Value.ToArray();
        int dm = x.Length;
        double rms = 1 / Math.Sqrt(x.Sum(v => v * v) / dm + m.Config.RmsNormEps);
        var h = x.Select((v, i) => v * rms * w[i]).ToArray();
        return Enumerable.Range(0, m.Config.VocabSize).Select(t => Enumerable.Range(0, dm).Sum(i => h[i] * head[t * dm + i])).ToArray();
    }

    private static double[] Sum(float[] x0, params IEnumerable<float[]>[] parts)
    {
        var s = x0.Select(v => (double)v).ToArray();
        foreach (var part in parts)
        {
            foreach (var v in part)
            {
                for (int i = 0; i < s.Length; i++) s[i] += v[i];
            }
        }

        return s;
    }

    /// <summary>fp32 layer outputs of a mixed batch, summed in double, against each model's own fp32 forward (logits of a few units): the serving step tolerance, loosened for the sum.</summary>
    private static readonly (double Atol, double Rtol) LayerSumTolerance = (2e-4, 2e-4);

    private static readonly string[] Prompts = { "reverse abc=", "x", "hello there" };

    [TestCase(1)]
    [TestCase(2)]
    public void Decomposition_AddsUpToTheFineTunedForward_AndOneLayersPtcToTheBase(int layers)
    {
        using var device = new CpuDevice();
        var c = LlamaConfig.Tiny with { NumHiddenLayers = layers };
        using var model = ServingTests.UnitScaleTiny(device, 3, c);
        var adapter = ServingTests.Adapter(c, 4, LoraAdapterConfig.LlamaLinear, 40, scaleB: 0.5f);
        using var set = new VariantSet(model);
        set.AddLora("fine", adapter);
        using var merged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        LoraMerge.Merge(merged, adapter);
        var results = TuningContribution.Measure(set, "fine", Prompts);
        var tolerance = LayerSumTolerance;
        for (int k = 0; k < Prompts.Length; k++)
        {
            var r = results[k];
            Assert.That(r.Ptc, Has.Length.EqualTo(layers));
            var tokens = model.Tokenizer.EncodeStart(Prompts[k]).ToArray();
            var fine = MixedBatch.Alone(merged, tokens);
            Check.Close(Head(merged, Sum(r.Embedding, r.Ptc, r.Ftc)).Select(v => (float)v).ToArray(), fine, tolerance, $"'{Prompts[k]}': x0 + sum PTC + sum FTC");
            if (layers == 1)
            {
                Check.Close(Head(model, Sum(r.Embedding, r.Ptc)).Select(v => (float)v).ToArray(), MixedBatch.Alone(model, tokens), tolerance, $"'{Prompts[k]}': x0 + PTC is the base");
            }
            else
            {
                // PTC_1 is the base's layer 1 applied to the fine-tuned stream x_1: a model of the fine-tune's layer 0
                // and the base's layer 1 ends at x_1 + PTC_1.
                using var hybrid = LlamaModel.FromTensors(device, c, (name, _) => (name.StartsWith("model.layers.0.", StringComparison.Ordinal) ? merged : model)[name].Value.ToArray());
                Check.Close(Head(hybrid, Sum(r.Embedding, r.Ptc, r.Ftc.Take(1))).Select(v => (float)v).ToArray(), MixedBatch.Alone(hybrid, tokens), tolerance,
                    $"'{Prompts[k]}': x_1 + PTC_1 is the base's layer 1 on the fine-tuned stream");
            }

            Assert.That(r.TuCo, Is.InRange(0.01, 1.0), "the adapter contributes");
        }
    }

    [Test]
    public void AnAdapterThatChangesNothing_ScoresZero_AndAFullFineTuneScoresAsItsLoraDoes()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 3);
        var zero = ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 40, scaleB: 0f);
        var real = ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 40, scaleB: 0.5f);
        using var set = new VariantSet(model);
        set.AddLora("zero", zero);
        set.AddLora("real", real);
        Assert.That(TuningContribution.Measure(set, "zero", Prompts).Select(r => r.TuCo), Is.All.EqualTo(0.0), "B = 0: FTC is exactly zero");
        using var merged = LlamaModel.FromTensors(device, model.Config, (name, _) => model[name].Value.ToArray());
        LoraMerge.Merge(merged, real);
        var asVariant = TuningContribution.Measure(set, "real", Prompts).Select(r => r.TuCo).ToArray();
        var asModel = TuningContribution.Measure(model, merged, Prompts).Select(r => r.TuCo).ToArray();
        Assert.That(asModel, Is.EqualTo(asVariant).Within(1e-4));
        Assert.Throws<ArgumentException>(() => TuningContribution.Measure(set, "base", Prompts));
        // A full fine-tune that also moves the (tied) embedding: x_0 is the fine-tune's, and the parts still add up to it.
        var emb = merged["model.embed_tokens.weight"].Value;
        emb.CopyFrom(emb.ToArray().Select((v, i) => v + 0.05f * MathF.Sin(i)).ToArray());
        var moved = TuningContribution.Measure(model, merged, Prompts);
        for (int k = 0; k < Prompts.Length; k++)
        {
            var tokens = model.Tokenizer.EncodeStart(Prompts[k]).ToArray();
            Check.Close(Head(merged, Sum(moved[k].Embedding, moved[k].Ptc, moved[k].Ftc)).Select(v => (float)v).ToArray(), MixedBatch.Alone(merged, tokens), LayerSumTolerance,
                $"'{Prompts[k]}': with a moved embedding");
        }
    }
}
