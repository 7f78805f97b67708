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

    [TestCase(4, new[] { 3, 3, 3 }, 0, 0, TestName = "GroupedLoss_EqualsThePromptCopiedPerCompletion_LossAndEveryGradient_P4_G3")]
    [TestCase(1, new[] { 2, 4 }, 0, 0, TestName = "GroupedLoss_EqualsThePromptCopiedPerCompletion_LossAndEveryGradient_P1_RaggedCompletions")]
    [TestCase(4, new[] { 3, 1, 2 }, 3, 0, TestName = "GroupedLoss_BehindPrefixTuning_EqualsThePromptCopiedPerCompletion")]
    [TestCase(1, new[] { 2, 3 }, 2, 5, TestName = "GroupedLoss_BehindAProjectedPrefix_EqualsThePromptCopiedPerCompletion_P1")]
    public void GroupedLoss_EqualsCopied(int promptLength, int[] completionLengths, int virtualTokens, int projectionHidden)
    {
        using var device = new CpuDevice();
        using var grouped = UnitModel(device, 1);
        using var copied = UnitModel(device, 1);
        if (virtualTokens > 0)
        {
            // The same virtual tokens (same seed) on both; every base parameter trains too, so all gradients are compared.
            foreach (var m in new[] { grouped, copied })
            {
                m.AddPrefixTuning(virtualTokens, seed: 6, projectionHidden: projectionHidden);
                foreach (var p in m.Parameters) p.Trainable = true;
            }
        }

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

        if (virtualTokens > 0)
        {
            var prefixGrads = grouped.Prefix!.Parameters.Zip(copied.Prefix!.Parameters).ToList();
            Assert.That(prefixGrads.Any(pair => pair.Second.Grad.ToArray().Any(g => g != 0f)), "the virtual tokens get gradients");
            foreach (var (g, c) in prefixGrads) Check.Close(g.Grad.ToArray(), c.Grad.ToArray(), (2e-6, 1e-4), $"gradient of {c.Name}");
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

public sealed class PrefixProjectionTests : PeftSharp.Tests.Infrastructure.TempDirectoryTest
{
    [Test]
    public void PrefixProjection_GradientsMatchFiniteDifferences_AndTheExportReproducesTheModel()
    {
        using var device = new CpuDevice();
        var config = LoraTrainingTests.Micro;
        using var model = LlamaModel.FromTensors(device, config, (name, shape) =>
        {
            int n = shape.Aggregate(1, (a, b) => a * b);
            var v = TestData.Uniform(n, (name.Aggregate(17, (h, c) => unchecked(h * 31 + c)) & 0x7fff) + 3, -0.5f, 0.5f);
            return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
        });
        model.AddPrefixTuning(tokens: 2, seed: 5, projectionHidden: 6);
        var trainable = model.AllParameters.Where(p => p.Trainable).ToList();
        Assert.That(trainable.Select(p => p.Name), Is.EquivalentTo(new[] { "prefix.embedding", "prefix.transform.0.weight", "prefix.transform.0.bias", "prefix.transform.2.weight",
            "prefix.transform.2.bias" }));
        var tokens = LoraTrainingTests.Tokens;
        var targets = LoraTrainingTests.Targets;
        model.ZeroGrad();
        model.Loss(tokens, targets, 2, backward: true);
        Assert.That(ModelGradients.Check(model, trainable, tokens, targets, batch: 2, samples: 3), Is.EqualTo(3 * trainable.Count));

        using (var opt = new PeftSharp.Training.AdamW(model.AllParameters, weightDecay: 0f))
        {
            model.ZeroGrad();
            model.Loss(tokens, targets, 2, backward: true);
            opt.Step(1e-2f);
        }

        var logits = model.Logits(tokens, 2);
        string dir = Path.Combine(TempDir, "prefix");
        PeftSharp.Formats.PeftPrefixAdapter.From(model).Save(dir, config);
        var loaded = PeftSharp.Formats.PeftPrefixAdapter.Load(dir, config);
        using var plain = LlamaModel.FromTensors(device, config, (name, _) => model[name].Value.ToArray());
        plain.AddPrefixTuning(loaded.VirtualTokens, seed: 0, loaded.Keys, loaded.Values);
        Check.Close(plain.Logits(tokens, 2), logits, (1e-6, 1e-5), "the exported keys and values reproduce the reparameterised model");
    }
}

public sealed class PeftPrefixAdapterTests : PeftSharp.Tests.Infrastructure.TempDirectoryTest
{
    [Test]
    public void PrefixFolder_UsesPeftsLayout_RoundTripsExactly_AndRejectsMismatches()
    {
        var config = LoraTrainingTests.Micro; // 2 layers, Hkv = 1, D = 4: token_dim 4
        const int p = 3, tokenDim = 4, layers = 2;
        // prompt_embeddings written as PEFT lays it out: row t = [layer 0 key, layer 0 value, layer 1 key, layer 1 value].
        var emb = new float[p * layers * 2 * tokenDim];
        for (int t = 0; t < p; t++)
        for (int l = 0; l < layers; l++)
        for (int kv = 0; kv < 2; kv++)
        for (int e = 0; e < tokenDim; e++)
        {
            emb[((t * layers + l) * 2 + kv) * tokenDim + e] = 1000 * t + 100 * l + 10 * kv + e;
        }

        string dir = Path.Combine(TempDir, "prefix");
        Directory.CreateDirectory(dir);
        PeftSharp.Formats.SafeTensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"), new[] { new PeftSharp.Formats.SafeTensorData("prompt_embeddings", emb, new[] { p,
            layers * 2 * tokenDim }) });
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """
            {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "token_dim": 4, "num_transformer_submodules": 1,
             "num_attention_heads": 1, "num_layers": 2, "encoder_hidden_size": 8, "prefix_projection": false}
            """);
        var a = PeftSharp.Formats.PeftPrefixAdapter.Load(dir, config);
        Assert.That(a.Keys[1].AsSpan(2 * tokenDim, tokenDim).ToArray(), Is.EqualTo(new float[] { 2100, 2101, 2102, 2103 }), "layer 1's key of virtual token 2");
        Assert.That(a.Values[0].AsSpan(0, tokenDim).ToArray(), Is.EqualTo(new float[] { 10, 11, 12, 13 }), "layer 0's value of virtual token 0");
        string back = Path.Combine(TempDir, "back");
        a.Save(back, config);
        using (var f = PeftSharp.Formats.SafeTensorsFile.Open(Path.Combine(back, "adapter_model.safetensors")))
        {
            Assert.That(f.ReadFloats("prompt_embeddings"), Is.EqualTo(emb), "save writes the same layout back");
        }

        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "token_dim": 8, "num_layers": 4, "prefix_projection": true}""");
        var e2 = Assert.Throws<PeftSharpInputException>(() => PeftSharp.Formats.PeftPrefixAdapter.Load(dir, config))!;
        Assert.That(e2.Message, Does.Contain("prefix_projection").And.Contain("num_layers is 4").And.Contain("token_dim is 8"));
    }
}
