using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Managed;

/// <summary>Many sequences and many variants in one model step give what each sequence gets alone.</summary>
public sealed class ServingTests
{
    // A step's rows go through linears with a different row count than a single sequence's, so the CPU GEMM may take
    // another blocking path (small-M dot products vs. packed panels) and sum in another order: fp32 rounding only.
    private static readonly (double Atol, double Rtol) StepTolerance = (2e-5, 2e-4);

    /// <summary>The tiny config (or another) with weights in +-0.3 and unit norms: generated text then depends on the whole context.</summary>
    internal static LlamaModel UnitScaleTiny(PeftSharp.Engine.Device device, int salt, LlamaConfig? config = null) => LlamaModel.FromTensors(device, config ?? LlamaConfig.Tiny, (name, shape) =>
        name.EndsWith("norm.weight", StringComparison.Ordinal)
            ? Enumerable.Repeat(1f, shape.Aggregate(1, (x, y) => x * y)).ToArray()
            : TestData.Uniform(shape.Aggregate(1, (x, y) => x * y), name.Length * salt + shape[0], -0.3f, 0.3f));

    /// <summary>Three virtual tokens' keys and values per layer, in +-2 (large enough to change the output).</summary>
    private static (float[][] Keys, float[][] Values) VirtualTokens(LlamaConfig c, int seed)
    {
        int size = 3 * c.NumKeyValueHeads * c.HeadDim;
        return (Enumerable.Range(0, c.NumHiddenLayers).Select(l => TestData.Uniform(size, seed + l, -2f, 2f)).ToArray(),
            Enumerable.Range(0, c.NumHiddenLayers).Select(l => TestData.Uniform(size, seed + 5 + l, -2f, 2f)).ToArray());
    }

    internal static PeftLoraAdapter Adapter(LlamaConfig c, int rank, string[] targets, int seed, float scaleB = 0.2f)
    {
        var config = new LoraAdapterConfig { R = rank, LoraAlpha = 2 * rank, TargetModules = targets };
        var modules = config.TargetsIn(c).ToDictionary(m => m, m =>
        {
            var (o, i) = PeftLoraAdapter.LinearShape(c, m);
            return (TestData.Uniform(rank * i, seed++, -0.2f, 0.2f), TestData.Uniform(o * rank, seed++, -scaleB, scaleB));
        });
        return new PeftLoraAdapter(config, modules);
    }

    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void DecodeBatch_EqualsEachSequenceAlone(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = LlamaConfig.Tiny with { HiddenSize = 32, IntermediateSize = 40, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 37 };
        using var model = LlamaModel.Create(device, config, seed: 6);
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5 }, new[] { 9, 2, 6, 5, 3 } };
        var alone = prompts.Select(p =>
        {
            using var cache = new KvCache(model, 8);
            var first = model.DecodeStep(cache, p);
            return (first, model.DecodeStep(cache, new[] { 7 }));
        }).ToArray();
        var caches = prompts.Select(_ => new KvCache(model, 8)).ToArray();
        try
        {
            var prefill = model.DecodeBatch(caches, prompts);
            var next = model.DecodeBatch(caches, prompts.Select(_ => new[] { 7 }).ToArray());
            for (int j = 0; j < prompts.Length; j++)
            {
                Check.Close(prefill[j], alone[j].first, StepTolerance, $"{backend} prefill of sequence {j}");
                Check.Close(next[j], alone[j].Item2, StepTolerance, $"{backend} next step of sequence {j}");
                Assert.That(caches[j].Length, Is.EqualTo(prompts[j].Length + 1));
            }
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }
    }

    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void MixedVariantStep_EqualsEachRowWithItsAdapterMerged(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = LlamaConfig.Tiny with { HiddenSize = 32, IntermediateSize = 40, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 37 };
        using var model = LlamaModel.Create(device, config, seed: 8);
        // Two adapters of different ranks on different module sets; rows: base, a, b, a.
        var a = Adapter(config, 4, new[] { "q_proj", "v_proj", "down_proj" }, 100);
        var b = Adapter(config, 2, LoraAdapterConfig.LlamaLinear, 200);
        // A DoRA adapter: magnitudes away from the row norms, so its rescaling shows.
        var dora = new PeftLoraAdapter(a.Config with { UseDora = true, TargetModules = new[] { "k_proj", "up_proj" } },
            Adapter(config, 4, new[] { "k_proj", "up_proj" }, 150).Modules,
            new LoraAdapterConfig { TargetModules = new[] { "k_proj", "up_proj" } }.TargetsIn(config).ToDictionary(m => m, m => TestData.Uniform(PeftLoraAdapter.LinearShape(config, m).Out,
                m.Length, 0.5f, 1.5f)));
        using var set = new VariantSet(model);
        set.AddLora("a", a);
        set.AddLora("b", b);
        set.AddLora("dora", dora);
        string?[] names = { null, "a", "b", "a", "dora" };
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 8 }, new[] { 9, 2 }, new[] { 6 }, new[] { 2, 7 } };
        var caches = prompts.Select(_ => new KvCache(model, 8)).ToArray();
        float[][] batched;
        try
        {
            var rows = prompts.SelectMany((p, j) => Enumerable.Repeat(set.IndexOf(names[j]), p.Length)).ToArray();
            using var bound = set.Bind(rows);
            batched = model.DecodeBatch(caches, prompts, bound);
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }

        for (int j = 0; j < prompts.Length; j++)
        {
            var adapter = names[j] switch { "a" => a, "b" => b, "dora" => dora, _ => null };
            var record = adapter != null ? LoraMerge.Merge(model, adapter) : null;
            using (var cache = new KvCache(model, 8))
            {
                // Merged weights round W + s B A once in fp32, the batch adds s (x A^T) B^T separately: rounding only.
                Check.Close(batched[j], model.DecodeStep(cache, prompts[j]), StepTolerance, $"{backend} request {j} ({names[j] ?? "base"})");
            }

            if (adapter != null) LoraMerge.Unmerge(model, adapter, record);
        }

        Assert.That(batched[1], Is.Not.EqualTo(batched[0]).Within(1e-3), "the adapter changes the logits, so the check above can fail");
    }

    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void MixedBatchOfBaseLoraOneBitAndSparseRows_EqualsEachRowAlone(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = BitDeltaCompressionTests.Small;
        using var model = LlamaModel.Create(device, config, seed: 10);
        using var fineA = BitDeltaCompressionTests.FineTuneOf(model, 500);
        using var fineB = BitDeltaCompressionTests.FineTuneOf(model, 600);
        var deltaA = PeftSharp.Compression.BitDelta.Compress(model, fineA, rounds: 1);
        var deltaB = PeftSharp.Compression.BitDelta.Compress(model, fineB, rounds: 2);
        var lora = Adapter(config, 3, new[] { "q_proj", "up_proj" }, 700);
        using var fineC = BitDeltaCompressionTests.FineTuneOf(model, 650);
        var linear = LoraAdapterConfig.LlamaLinearModules(config).Select(m => m + ".weight").ToArray();
        var sparse = PeftSharp.Variants.SparseDelta.Between(model, fineC, linear.ToDictionary(n => n, n => Enumerable.Range(0, model[n].Value.Length).Where(i => i % 7 == 0).ToArray()));
        using var set = new VariantSet(model);
        set.AddDelta("bits-a", deltaA);
        set.AddLora("lora", lora);
        set.AddDelta("bits-b", deltaB);
        set.AddSparse("sparse", sparse);
        string?[] names = { "bits-a", null, "lora", "bits-b", "bits-a", "sparse" };
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 8 }, new[] { 9 }, new[] { 2, 6, 5 }, new[] { 7, 7 }, new[] { 1, 2 } };
        var caches = prompts.Select(_ => new KvCache(model, 8)).ToArray();
        float[][] batched;
        try
        {
            using var bound = set.Bind(prompts.SelectMany((p, j) => Enumerable.Repeat(set.IndexOf(names[j]), p.Length)).ToArray());
            batched = model.DecodeBatch(caches, prompts, bound);
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }

        for (int j = 0; j < prompts.Length; j++)
        {
            using var alone = LlamaModel.FromTensors(device, config, (name, _) => model[name].Value.ToArray());
            if (names[j] == "lora") LoraMerge.Merge(alone, lora);
            if (names[j] == "bits-a") deltaA.MergeInto(alone);
            if (names[j] == "bits-b") deltaB.MergeInto(alone);
            if (names[j] == "sparse") sparse.ApplyTo(alone);
            using var cache = new KvCache(alone, 8);
            Check.Close(batched[j], alone.DecodeStep(cache, prompts[j]), StepTolerance, $"{backend} row group {j} ({names[j] ?? "base"})");
        }

        Assert.That(batched[0], Is.Not.EqualTo(batched[4]).Within(1e-4), "different prompts");
    }

    /// <summary>
    /// Variants of a full fine-tune change the embedding (and with it the tied LM head) and norms too: the 1-bit delta
    /// keeps them densely and a sparse delta may touch them; their rows use their own copies in the mixed batch,
    /// next to base rows, and each equals the variant merged and run alone.
    /// </summary>
    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void MixedBatch_VariantsThatChangeNormsAndEmbeddings_EqualEachRowAlone(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = BitDeltaCompressionTests.Small;
        // Compression on the CPU backend (the simulator is slow and compression is not what is checked here); the
        // served base has the same values, so the deltas' base fingerprints match it.
        using var host = new CpuDevice();
        using var cpuBase = LlamaModel.Create(host, config, seed: 11);
        using var model = LlamaModel.FromTensors(device, config, (name, _) => cpuBase[name].Value.ToArray());
        using var full = LlamaModel.FromTensors(host, config, (name, shape) =>
        {
            var v = cpuBase[name].Value.ToArray();
            if (name.EndsWith("norm.weight", StringComparison.Ordinal) || name == "model.embed_tokens.weight")
            {
                var noise = TestData.Uniform(v.Length, name.Length, -0.3f, 0.3f);
                for (int i = 0; i < v.Length; i++) v[i] += noise[i];
            }
            else
            {
                var noise = TestData.Uniform(v.Length, 900 + name.Length, -0.02f, 0.02f);
                for (int i = 0; i < v.Length; i++) v[i] += noise[i];
            }

            return v;
        });
        var delta = PeftSharp.Compression.BitDelta.Compress(cpuBase, full, rounds: 1);
        Assert.That(delta.Dense.Keys, Does.Contain("model.embed_tokens.weight").And.Contain("model.norm.weight").And.Contain("model.layers.0.input_layernorm.weight"));
        var sparse = PeftSharp.Variants.SparseDelta.Between(cpuBase, full, new Dictionary<string, int[]>
        {
            ["model.layers.1.post_attention_layernorm.weight"] = new[] { 0, 3, 5 },
            ["model.layers.0.mlp.up_proj.weight"] = Enumerable.Range(0, 40).Select(i => i * 7).ToArray(),
        });
        using var set = new VariantSet(model);
        set.AddDelta("full", delta);
        set.AddSparse("sparse", sparse);
        string?[] names = { "full", null, "sparse", "full" };
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 8 }, new[] { 9, 2 }, new[] { 2 } };
        var caches = prompts.Select(_ => new KvCache(model, 8)).ToArray();
        float[][] batched, second;
        try
        {
            using (var bound = set.Bind(prompts.SelectMany((p, j) => Enumerable.Repeat(set.IndexOf(names[j]), p.Length)).ToArray()))
            {
                batched = model.DecodeBatch(caches, prompts, bound);
            }

            using (var bound = set.Bind(names.Select(set.IndexOf).ToArray()))
            {
                second = model.DecodeBatch(caches, prompts.Select(_ => new[] { 6 }).ToArray(), bound);
            }
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }

        for (int j = 0; j < prompts.Length; j++)
        {
            using var alone = LlamaModel.FromTensors(device, config, (name, _) => model[name].Value.ToArray());
            if (names[j] == "full") delta.MergeInto(alone);
            if (names[j] == "sparse") sparse.ApplyTo(alone);
            using var cache = new KvCache(alone, 8);
            Check.Close(batched[j], alone.DecodeStep(cache, prompts[j]), StepTolerance, $"{backend} request {j} ({names[j] ?? "base"}) prefill");
            Check.Close(second[j], alone.DecodeStep(cache, new[] { 6 }), StepTolerance, $"{backend} request {j} ({names[j] ?? "base"}) next token");
        }

        using var baseCache = new KvCache(model, 8);
        Assert.That(batched[0], Is.Not.EqualTo(model.DecodeStep(baseCache, prompts[0])).Within(1e-3), "the variant's own norms and embedding change the logits");
    }

    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void DecodeBatch_WithASharedPrefixCache_EqualsEachSequenceWithThePrefixInItsOwnCache(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = LlamaConfig.Tiny with { HiddenSize = 32, IntermediateSize = 40, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 37 };
        using var model = LlamaModel.Create(device, config, seed: 14);
        int[] prefix = { 1, 9, 9, 4, 30 };
        int[][] suffixes = { new[] { 3 }, new[] { 5, 8 }, new[] { 2, 2, 6 } };
        using var shared = new KvCache(model, prefix.Length);
        model.DecodeStep(shared, prefix);
        var caches = suffixes.Select(_ => new KvCache(model, 6)).ToArray();
        try
        {
            var first = model.DecodeBatch(caches, suffixes, prefixes: caches.Select(_ => shared).ToArray());
            var second = model.DecodeBatch(caches, suffixes.Select(_ => new[] { 7 }).ToArray(), prefixes: caches.Select(_ => shared).ToArray());
            for (int j = 0; j < suffixes.Length; j++)
            {
                using var own = new KvCache(model, 12);
                Check.Close(first[j], model.DecodeStep(own, prefix.Concat(suffixes[j]).ToArray()), StepTolerance, $"{backend} sequence {j} prefill over the shared prefix");
                Check.Close(second[j], model.DecodeStep(own, new[] { 7 }), StepTolerance, $"{backend} sequence {j} next step");
            }

            Assert.That(shared.Length, Is.EqualTo(prefix.Length), "the shared prefix is read, never written");
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }
    }

    [Test]
    public void BatchGenerator_SharedPrefixes_ToldAndDetected_GiveTheSameTokensAsWithout()
    {
        using var device = new CpuDevice();
        // Unit-scale weights, so the generated text depends on the whole context (a 0.02-init model repeats one byte).
        using var model = UnitScaleTiny(device, 7);
        var a = Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 310, scaleB: 0.5f);
        using var set = new VariantSet(model);
        set.AddLora("a", a);
        const string system = "You reverse strings. Example: abc -> cba. Now: ";
        var requests = new List<GenerationRequest>();
        foreach (var (prompt, variant) in new[] { ("hello", (string?)null), ("world", "a"), ("abc", null), ("xyz", "a"), ("q", null) })
        {
            requests.Add(new GenerationRequest(prompt, variant, MaxTokens: 5, SharedPrefix: system));       // told
            requests.Add(new GenerationRequest("detect me: " + prompt, variant, MaxTokens: 4, Temperature: 0.8f, Seed: prompt.Length)); // found
        }

        var (off, none) = BatchGenerator.GenerateWithReport(model, requests, set, PrefixSharing.Off);
        var (shared, report) = BatchGenerator.GenerateWithReport(model, requests, set, PrefixSharing.Auto);
        Assert.That(none, Is.EqualTo(new SharingReport(0, 0, 0)));
        // Told: one prefix per variant (base, a); found: "[BOS]detect me: " per variant.
        Assert.That(report.Prefixes, Is.EqualTo(4));
        Assert.That(report.SharingSequences, Is.EqualTo(10));
        Assert.That(shared.Select(r => r.Completion), Is.EqualTo(off.Select(r => r.Completion)));
        Assert.That(off.Select(r => r.Completion).Distinct().Count(), Is.GreaterThan(6), "outputs depend on the context, so a wrong prefix would show");
        var told = BatchGenerator.GenerateWithReport(model, requests, set, PrefixSharing.Told);
        Assert.That(told.Sharing.Prefixes, Is.EqualTo(2));
        Assert.That(told.Results.Select(r => r.Completion), Is.EqualTo(off.Select(r => r.Completion)));
    }

    [Test]
    public void VariantSet_FreshSetUsedFromSeveralThreads_GivesEachThreadTheSingleThreadedResult()
    {
        using var device = new CpuDevice();
        using var model = UnitScaleTiny(device, 7);
        var a = Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 310, scaleB: 0.5f);
        var b = Adapter(model.Config, 2, new[] { "q_proj", "down_proj" }, 410, scaleB: 0.5f);
        var requests = Enumerable.Range(0, 4).Select(t => new[]
        {
            new GenerationRequest($"thread {t} base", null, MaxTokens: 4),
            new GenerationRequest($"thread {t} a", "a", MaxTokens: 4),
            new GenerationRequest($"thread {t} b", "b", MaxTokens: 4, Temperature: 0.7f, Seed: t),
        }).ToArray();
        string[][] expected;
        using (var alone = new VariantSet(model))
        {
            alone.AddLora("a", a);
            alone.AddLora("b", b);
            expected = requests.Select(r => BatchGenerator.Generate(model, r, alone).Select(x => x.Completion).ToArray()).ToArray();
        }

        // A fresh set: its pools are built lazily by the first batch, which all four threads race to start; a third
        // variant registered meanwhile rebuilds them between two threads' generations, never under one.
        var set = new VariantSet(model);
        set.AddLora("a", a);
        set.AddLora("b", b);
        var got = new string[4][];
        using var start = new Barrier(5);
        var threads = Enumerable.Range(0, 4).Select(t => new Thread(() =>
        {
            start.SignalAndWait();
            got[t] = BatchGenerator.Generate(model, requests[t], set).Select(x => x.Completion).ToArray();
        })).ToList();
        threads.ForEach(t => t.Start());
        start.SignalAndWait();
        set.AddLora("c", Adapter(model.Config, 2, new[] { "v_proj" }, 510));
        threads.ForEach(t => t.Join());
        Assert.That(got, Is.EqualTo(expected));
        set.Dispose();
        set.Dispose(); // twice: harmless
        Assert.Throws<ObjectDisposedException>(() => BatchGenerator.Generate(model, requests[1], set));
    }

    [Test]
    public void BatchGenerator_ATreeOfToldPrefixes_SystemThenFewShot_GivesTheSameTokensAsWithout()
    {
        using var device = new CpuDevice();
        using var model = UnitScaleTiny(device, 11);
        const string system = "System: reverse what you are given. ";
        string[] shots = { "abc -> cba; ", "hello -> olleh; " };
        var requests = new List<GenerationRequest>();
        for (int i = 0; i < 6; i++)
        {
            requests.Add(new GenerationRequest($"q{i} ->", MaxTokens: 4, SharedPrefixes: new[] { system, shots[i % 2] }));
        }

        requests.Add(new GenerationRequest("alone ->", MaxTokens: 4, SharedPrefixes: new[] { system, "a unique block; " }));
        var (off, _) = BatchGenerator.GenerateWithReport(model, requests, null, PrefixSharing.Off);
        var (tree, report) = BatchGenerator.GenerateWithReport(model, requests, null, PrefixSharing.Told);
        // Nodes: the system prompt (7 readers), each few-shot block (3 readers each); the unique block stays in its request.
        Assert.That(report.Prefixes, Is.EqualTo(3));
        Assert.That(report.SharingSequences, Is.EqualTo(7));
        Assert.That(tree.Select(r => r.Completion), Is.EqualTo(off.Select(r => r.Completion)));
        Assert.That(off.Select(r => r.Completion).Distinct().Count(), Is.GreaterThan(3), "outputs depend on the context");
    }

    [Test]
    public void BatchGenerator_PrefixTunedLoraAndBaseRowsInOneBatch_MatchEachModelAlone()
    {
        using var device = new CpuDevice();
        using var model = UnitScaleTiny(device, 13);
        var c = model.Config;
        var (keys, values) = VirtualTokens(c, 90);
        var lora = Adapter(c, 4, LoraAdapterConfig.LlamaLinear, 320, scaleB: 0.5f);
        using var set = new VariantSet(model);
        set.AddPrefix("p", new PeftPrefixAdapter(3, keys, values));
        set.AddLora("l", lora);
        var requests = new[]
        {
            new GenerationRequest("abc", "p", MaxTokens: 5), new GenerationRequest("abc", "l", MaxTokens: 5),
            new GenerationRequest("abc", null, MaxTokens: 5), new GenerationRequest("xyz!", "p", MaxTokens: 4),
        };
        var batched = BatchGenerator.Generate(model, requests, set);
        string baseOut = Generator.Greedy(model, "abc", 5);
        using (var prefixed = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray()))
        {
            prefixed.AddPrefixTuning(3, seed: 0, keys, values);
            Assert.That(batched[0].Completion, Is.EqualTo(Generator.Greedy(prefixed, "abc", 5)));
            Assert.That(batched[3].Completion, Is.EqualTo(Generator.Greedy(prefixed, "xyz!", 4)));
        }

        LoraMerge.Merge(model, lora);
        Assert.That(batched[1].Completion, Is.EqualTo(Generator.Greedy(model, "abc", 5)));
        Assert.That(batched[2].Completion, Is.EqualTo(baseOut));
        Assert.That(batched[0].Completion, Is.Not.EqualTo(baseOut), "the prefix changes the output, so the check can fail");
    }

    [Test]
    public void VariantSet_Remove_ShiftsLaterVariantsWithTheirPrefixesAndOwnParameters()
    {
        using var device = new CpuDevice();
        using var model = UnitScaleTiny(device, 14);
        var c = model.Config;
        var (keys, values) = VirtualTokens(c, 70);
        var lora = Adapter(c, 4, LoraAdapterConfig.LlamaLinear, 330, scaleB: 0.5f);
        var norms = new PeftLnTuningAdapter(new[] { "norm" }, null, new Dictionary<string, float[]>
        {
            ["model.norm.weight"] = TestData.Uniform(c.HiddenSize, 77, 0.2f, 2f),
        });
        using var set = new VariantSet(model);
        set.AddLora("l", lora);
        set.AddPrefix("p", new PeftPrefixAdapter(3, keys, values));
        set.AddNorms("n", norms);
        var requests = new[] { new GenerationRequest("abc", "p", MaxTokens: 5), new GenerationRequest("abc", "n", MaxTokens: 5) };
        var before = BatchGenerator.Generate(model, requests, set).Select(r => r.Completion).ToArray();
        set.Remove("l");
        Assert.That(set.Names, Is.EqualTo(new[] { "p", "n" }));
        Assert.That(BatchGenerator.Generate(model, requests, set).Select(r => r.Completion), Is.EqualTo(before));
        Assert.Throws<ArgumentException>(() => set.Remove("l"));
        set.AddLora("l", lora);
        Assert.That(set.IndexOf("l"), Is.EqualTo(2));
    }

    [Test]
    public void BatchGenerator_MixedAdapters_MatchesGreedyWithEachAdapterMerged()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 9);
        var a = Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 300, scaleB: 0.5f);
        using var set = new VariantSet(model);
        set.AddLora("a", a);
        var requests = new[]
        {
            new GenerationRequest("abc", "a", MaxTokens: 6),
            new GenerationRequest("abc", null, MaxTokens: 6),
            new GenerationRequest("hello", "a", MaxTokens: 3),
        };
        var results = BatchGenerator.Generate(model, requests, set);
        string baseAbc = Generator.Greedy(model, "abc", 6);
        LoraMerge.Merge(model, a);
        Assert.That(results[0].Completion, Is.EqualTo(Generator.Greedy(model, "abc", 6)));
        Assert.That(results[2].Completion, Is.EqualTo(Generator.Greedy(model, "hello", 3)));
        Assert.That(results[1].Completion, Is.EqualTo(baseAbc));
        Assert.That(results[0].Completion, Is.Not.EqualTo(baseAbc), "the adapter must change the output, or the test could not fail");
        Assert.Throws<ArgumentException>(() => BatchGenerator.Generate(model, new[] { new GenerationRequest("x", "nope") }, set));
    }
}
