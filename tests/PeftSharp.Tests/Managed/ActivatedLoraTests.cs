using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Training;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// Activated LoRA (PEFT's alora_invocation_tokens): the adapter applies only from the start of the last occurrence of
/// its invocation tokens on, so the positions before it are the base model's and their KV cache is the base's. The
/// reference is computed without row variants at all: the base prefills the positions before the invocation into a
/// cache, then the adapter merged into the weights (as plain LoRA) continues from that cache and decodes greedily.
/// </summary>
public sealed class ActivatedLoraTests : TempDirectoryTest
{
    private const string Question = "You are a careful assistant. Reverse what follows: many variants";
    private const string Invocation = "<ask>";

    private static PeftLoraAdapter Activated(LlamaModel model, int seed = 900)
    {
        var plain = ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, seed, scaleB: 0.5f);
        var invocation = model.Tokenizer.Encode(Invocation).ToList();
        return new PeftLoraAdapter(plain.Config with { AloraInvocationTokens = invocation }, plain.Modules);
    }

    private static PeftLoraAdapter Plain(PeftLoraAdapter activated) => new(activated.Config with { AloraInvocationTokens = null }, activated.Modules);

    /// <summary>Greedy tokens of <paramref name="prompt"/>: the base model up to <paramref name="start"/>, the adapter merged into W from there.</summary>
    private static string Reference(LlamaModel model, PeftLoraAdapter activated, string prompt, int maxTokens)
    {
        var tokens = model.Tokenizer.EncodeStart(prompt).ToArray();
        int start = activated.Config.InvocationStart(tokens);
        Assert.That(start, Is.GreaterThan(0));
        using var before = new KvCache(model, start);
        model.DecodeBatch(new[] { before }, new[] { tokens[..start] });
        var plain = Plain(activated);
        var record = LoraMerge.Merge(model, plain);
        try
        {
            using var after = new KvCache(model, tokens.Length - start + maxTokens, before);
            var logits = model.DecodeBatch(new[] { after }, new[] { tokens[start..] })[0];
            var output = new List<int>();
            while (output.Count < maxTokens)
            {
                int t = Array.IndexOf(logits, logits.Max());
                if (t == model.Tokenizer.Eos || model.StopTokens.Contains(t)) break;
                output.Add(t);
                logits = model.DecodeBatch(new[] { after }, new[] { new[] { t } })[0];
            }

            return model.Tokenizer.Decode(output);
        }
        finally
        {
            LoraMerge.Unmerge(model, plain, record);
        }
    }

    [Test]
    public void Config_ReadsAndWritesTheInvocationTokens_AndFindsTheirLastOccurrence()
    {
        var config = PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": ["q_proj"], "alora_invocation_tokens": [5, 6]}""", "cfg");
        Assert.That(config.AloraInvocationTokens, Is.EqualTo(new[] { 5, 6 }));
        Assert.That(config.InvocationStart(new[] { 1, 5, 6, 2, 5, 6, 3 }), Is.EqualTo(4), "the last occurrence, as PEFT's calculate_alora_offsets");
        Assert.That(config.InvocationStart(new[] { 5, 6 }), Is.EqualTo(0));
        Assert.That(config.InvocationStart(new[] { 1, 5, 2, 6 }), Is.EqualTo(-1));
        Assert.That(config.InvocationStart(new[] { 6 }), Is.EqualTo(-1), "shorter than the invocation");
        Assert.That(config with { AloraInvocationTokens = null }, Has.Property(nameof(LoraAdapterConfig.AloraInvocationTokens)).Null);
        Assert.That((config with { AloraInvocationTokens = null }).InvocationStart(new[] { 1 }), Is.EqualTo(0), "an ordinary LoRA adapts every position");

        foreach (var (json, why) in new[]
        {
            ("[]", "not a non-empty list"), ("[\"a\"]", "not a non-empty list"), ("[-1]", "not a non-empty list"), ("[1.5]", "not a non-empty list"), ("7", "not a non-empty list"),
        })
        {
            var e = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig($$"""{"peft_type": "LORA", "target_modules": "all-linear", "alora_invocation_tokens": {{json}}}""", "cfg"))!;
            Assert.That(e.Message, Does.Contain("alora_invocation_tokens").And.Contain(why), json);
        }

        var dora = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
            """{"peft_type": "LORA", "target_modules": "all-linear", "use_dora": true, "alora_invocation_tokens": [3]}""", "cfg"))!;
        Assert.That(dora.Message, Does.Contain("use_dora"));
        var saved = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
            """{"peft_type": "LORA", "target_modules": "all-linear", "modules_to_save": ["lm_head"], "alora_invocation_tokens": [3]}""", "cfg"))!;
        Assert.That(saved.Message, Does.Contain("modules_to_save"));
    }

    [Test]
    public void Folder_RoundTrips_AndATokenOutsideTheVocabularyIsRefused()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 31);
        var adapter = Activated(model);
        adapter.Save(TempDir, model.Config);
        var back = PeftLoraAdapter.Load(TempDir, model.Config);
        Assert.That(back.Config.AloraInvocationTokens, Is.EqualTo(adapter.Config.AloraInvocationTokens));
        Assert.That(back.Kind, Is.EqualTo("aLoRA"));
        Assert.That(back.Modules.Keys, Is.EquivalentTo(adapter.Modules.Keys));

        new PeftLoraAdapter(adapter.Config with { AloraInvocationTokens = new[] { 3, model.Config.VocabSize } }, adapter.Modules).Save(TempDir, model.Config);
        var e = Assert.Throws<PeftSharpInputException>(() => PeftLoraAdapter.Load(TempDir, model.Config))!;
        Assert.That(e.Message, Does.Contain(TempDir).And.Contain($"[{model.Config.VocabSize}]").And.Contain("vocabulary"));
    }

    [Test]
    public void Merging_TrainingFrom_AndAPassOverEveryPosition_AreRefused()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 32);
        var adapter = Activated(model);
        Assert.That(Assert.Throws<NotSupportedException>(() => LoraMerge.Merge(model, adapter))!.Message, Does.Contain("activated LoRA").And.Contain("merged"));
        Assert.That(Assert.Throws<NotSupportedException>(() => model.AddLora(adapter.Config, 1, from: adapter))!.Message, Does.Contain("trained from"));
        using var set = new VariantSet(model);
        int v = set.AddLora("ask", adapter);
        Assert.That(set.InvocationOf(v), Is.EqualTo(adapter.Config.AloraInvocationTokens));
        Assert.That(Assert.Throws<NotSupportedException>(() => set.Bind(new[] { -1, v }))!.Message, Does.Contain("'ask'").And.Contain("activated LoRA"));
        using (set.Bind(new[] { -1, v }, activationResolved: true))
        {
        }
    }

    [Test]
    public void ClosedBatch_AdaptsFromTheInvocationOn_SharesTheBasesPrefix_AndRefusesAPromptWithoutIt()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 33);
        var adapter = Activated(model);
        string prompt = Question + Invocation;
        const int max = 6;
        string expected = Reference(model, adapter, prompt, max);

        using var set = new VariantSet(model);
        set.AddLora("ask", adapter);
        set.AddLora("plain", Plain(adapter));
        var alone = BatchGenerator.Generate(model, new[] { new GenerationRequest(prompt, "ask", MaxTokens: max) }, set, PrefixSharing.Off)[0].Completion;
        Assert.That(alone, Is.EqualTo(expected));
        // A mix-up would show: applied everywhere it is the plain LoRA, never applied it is the base.
        var plain = BatchGenerator.Generate(model, new[] { new GenerationRequest(prompt, "plain", MaxTokens: max) }, set, PrefixSharing.Off)[0].Completion;
        var baseOnly = BatchGenerator.Generate(model, new[] { new GenerationRequest(prompt, null, MaxTokens: max) }, set, PrefixSharing.Off)[0].Completion;
        Assert.That(new[] { plain, baseOnly }, Has.None.EqualTo(expected));

        // In one batch with base requests under a told prefix level: the level is computed once for the base rows and the aLoRA row.
        var level = new[] { Question[..30] };
        var batch = new[]
        {
            new GenerationRequest(Question[30..] + Invocation, "ask", MaxTokens: max, SharedPrefixes: level),
            new GenerationRequest(Question[30..] + " base", null, MaxTokens: max, SharedPrefixes: level),
            new GenerationRequest(Question[30..] + Invocation, "plain", MaxTokens: max, SharedPrefixes: level),
        };
        var (results, sharing) = BatchGenerator.GenerateWithReport(model, batch, set, PrefixSharing.Told);
        Assert.That(results[0].Completion, Is.EqualTo(expected));
        Assert.That(results[2].Completion, Is.EqualTo(plain));
        Assert.That(sharing.SharingSequences, Is.EqualTo(2), "the aLoRA request reads the base's level; the plain LoRA computes its own");

        var e = Assert.Throws<ArgumentException>(() => BatchGenerator.Generate(model, new[] { new GenerationRequest(Question, "ask", MaxTokens: 2) }, set))!;
        Assert.That(e.Message, Does.Contain("request 0").And.Contain("'ask'").And.Contain("invocation tokens"));
    }

    [Test]
    public void Eval_ScoresTheCompletion_WithTheBaseBeforeTheInvocation_AndRefusesAnExampleWithoutIt()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 35);
        var adapter = Activated(model);
        var example = new Example("t", Question + Invocation, " yes, twice");
        var (ids, targets) = Batcher.Encode(new[] { example }, model.Tokenizer, 256, completionOnly: true);
        int start = adapter.Config.InvocationStart(ids), used = Array.FindLastIndex(targets, t => t != Batcher.IgnoreIndex) + 1;

        // Reference: the base's cache before the invocation, then the merged adapter's logits at every later position.
        double expected;
        using (var before = new KvCache(model, start))
        {
            model.DecodeBatch(new[] { before }, new[] { ids[..start] });
            var plain = Plain(adapter);
            var record = LoraMerge.Merge(model, plain);
            using var after = new KvCache(model, used - start, before);
            var logits = model.DecodeBatchEveryPosition(new[] { after }, new[] { ids[start..used] });
            LoraMerge.Unmerge(model, plain, record);
            var counted = Enumerable.Range(start, used - start).Where(p => targets[p] != Batcher.IgnoreIndex).ToList();
            Assert.That(counted, Is.Not.Empty);
            expected = counted.Average(p => PeftSharp.Kernels.Core.CrossEntropyReference.LogSumExp(logits[p - start]) - logits[p - start][targets[p]]);
        }

        using var set = new VariantSet(model);
        set.AddLora("ask", adapter);
        set.AddLora("plain", Plain(adapter));
        var losses = Evaluator.ExampleLosses(model, set, new[] { "ask", "plain", null }, new[] { example }, 256);
        // fp32 logits against the double reference over the same fp32 products: agreement to a few ulps of the loss.
        const double Tolerance = 1e-4;
        Assert.That(losses[0][0], Is.EqualTo(expected).Within(Tolerance));
        Assert.That(Math.Abs(losses[1][0] - expected), Is.GreaterThan(100 * Tolerance), "applied everywhere (plain LoRA) scores otherwise");
        Assert.That(Math.Abs(losses[2][0] - expected), Is.GreaterThan(100 * Tolerance), "never applied (the base) scores otherwise");

        var e = Assert.Throws<ArgumentException>(() => Evaluator.ExampleLosses(model, set, new[] { "ask" }, new[] { example, new Example("t", Question, " no") }, 256))!;
        Assert.That(e.Message, Does.Contain("example 1").And.Contain("invocation tokens"));
    }

    [Test]
    public async Task Server_ReusesTheBasesCachedBlocks_MixesWithOtherRows_AndRefusesAPromptWithoutTheInvocation()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 34);
        var adapter = Activated(model);
        const int max = 6;
        string[] prompts = { Question + Invocation, Question + " and more" + Invocation + "x" };
        var expected = prompts.Select(p => Reference(model, adapter, p, max)).ToArray();

        using var server = new VariantServer(model, new VariantServerOptions { BlockSize = 4, PrefillChunk = 9, KvBlocks = 300 });
        server.Load("ask", adapter);
        server.Load("plain", Plain(adapter));
        await server.GenerateAsync(new GenerationRequest(Question, null, MaxTokens: 1)); // the base caches the question's whole blocks
        var first = await server.GenerateAsync(new GenerationRequest(prompts[0], "ask", MaxTokens: max));
        Assert.That(first.Completion, Is.EqualTo(expected[0]));
        int start = adapter.Config.InvocationStart(model.Tokenizer.EncodeStart(prompts[0]));
        Assert.That(first.CachedPromptTokens, Is.GreaterThan(0).And.LessThanOrEqualTo(start), "the base's blocks before the invocation, none after it");
        var plain = await server.GenerateAsync(new GenerationRequest(prompts[0], "plain", MaxTokens: max));
        Assert.That(plain.CachedPromptTokens, Is.EqualTo(0), "a plain LoRA changes every position's keys and values: no base block is its");
        Assert.That(plain.Completion, Is.Not.EqualTo(expected[0]));

        // Together with base and plain rows, arriving at once, prefilled in chunks across the invocation.
        var tasks = new[]
        {
            server.GenerateAsync(new GenerationRequest(prompts[1], "ask", MaxTokens: max)),
            server.GenerateAsync(new GenerationRequest(prompts[0], null, MaxTokens: max)),
            server.GenerateAsync(new GenerationRequest(prompts[0], "ask", MaxTokens: max)),
            server.GenerateAsync(new GenerationRequest(prompts[1], "plain", MaxTokens: max)),
        };
        var results = await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.That(results[0].Completion, Is.EqualTo(expected[1]));
        Assert.That(results[2].Completion, Is.EqualTo(expected[0]));
        var alone = BatchGenerator.Generate(model, new[] { new GenerationRequest(prompts[0], null, MaxTokens: max) })[0].Completion;
        Assert.That(results[1].Completion, Is.EqualTo(alone));

        var e = Assert.Throws<ArgumentException>(() => server.Start(new GenerationRequest(Question, "ask", MaxTokens: 2)))!;
        Assert.That(e.Message, Does.Contain("'ask'").And.Contain("invocation tokens"));
    }
}
