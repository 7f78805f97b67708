using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// The continuous-batching server: requests arriving at random times, over variants that swap in and out of the
/// device pools, with chunked prefill and a prefix cache, give what each request gives alone.
/// </summary>
public sealed class VariantServerTests
{
    private const string System = "You are a careful assistant. Reverse what follows. ";

    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(60);

    /// <summary>Each request generated alone by the closed batch path with every adapter registered (the reference).</summary>
    private static string[] Alone(LlamaModel model, IReadOnlyDictionary<string, PeftLoraAdapter> adapters, IEnumerable<GenerationRequest> requests)
    {
        using var set = new VariantSet(model);
        foreach (var (name, a) in adapters) set.AddLora(name, a);
        return requests.Select(r => BatchGenerator.Generate(model, new[] { r }, set, PrefixSharing.Off)[0].Completion).ToArray();
    }

    private static Dictionary<string, PeftLoraAdapter> Adapters(LlamaConfig c, int count) =>
        Enumerable.Range(0, count).ToDictionary(i => "a" + i, i => ServingTests.Adapter(c, 2 + i % 3, LoraAdapterConfig.LlamaLinear, 400 + 10 * i, scaleB: 0.5f));

    [Test]
    public async Task RandomArrivals_OverSwappingAdapters_EachRequestEqualsItAlone()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 17);
        var adapters = Adapters(model.Config, 4);
        var rng = new Random(5);
        var words = new[] { "hello", "world", "abc", "serving", "x", "many variants", "queue" };
        var requests = Enumerable.Range(0, 16).Select(i =>
        {
            string? variant = i % 5 == 0 ? null : "a" + (i % 4);
            string prompt = (i % 2 == 0 ? System : "") + words[i % words.Length] + (i % 3 == 0 ? " again" : "");
            return i % 4 == 3
                ? new GenerationRequest(prompt, variant, MaxTokens: 3 + i % 5, Temperature: 0.9f, TopP: 0.9f, Seed: i)
                : new GenerationRequest(prompt, variant, MaxTokens: 3 + i % 6);
        }).ToArray();
        var expected = Alone(model, adapters, requests);
        Assert.That(expected.Distinct().Count(), Is.GreaterThan(8), "outputs depend on prompt and variant, so a mix-up would show");

        // Two resident adapters for four (LRU swaps), four rows, 7-token prefill chunks, 4-position blocks.
        using var server = new VariantServer(model, new VariantServerOptions { MaxRows = 4, MaxLoras = 2, BlockSize = 4, PrefillChunk = 7, KvBlocks = 400 });
        foreach (var (name, a) in adapters) server.Load(name, a);
        var tasks = new List<Task<GenerationResult>>();
        foreach (var r in requests)
        {
            tasks.Add(server.GenerateAsync(r));
            await Task.Delay(rng.Next(0, 15));
        }

        var results = await Task.WhenAll(tasks).WaitAsync(Patience);
        Assert.That(results.Select(r => r.Completion), Is.EqualTo(expected));
        var stats = server.Stats;
        Assert.That(stats.FinishedRequests, Is.EqualTo(requests.Length));
        Assert.That(stats.ResidentAdapters.Count, Is.LessThanOrEqualTo(2));
        Assert.That(results.Sum(r => r.CachedPromptTokens), Is.GreaterThan(0), "requests of one variant with the system prompt reuse its blocks");
        Assert.That(stats.CachedPromptTokens, Is.EqualTo(results.Sum(r => r.CachedPromptTokens)));
        Assert.That(results.Select(r => r.PromptTokens), Is.EqualTo(requests.Select(r => model.Tokenizer.EncodeStart(r.Prompt).Count)));
    }

    [Test]
    public async Task PrefixCache_IsKeyedByVariant_AndSplitsAtABlockInsideACachedPrompt()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 19);
        var adapters = Adapters(model.Config, 1);
        using var server = new VariantServer(model, new VariantServerOptions { BlockSize = 4, KvBlocks = 200 });
        server.Load("a0", adapters["a0"]);
        string long1 = System + "first question, a long one";
        var first = await server.GenerateAsync(new GenerationRequest(long1, "a0", MaxTokens: 4));
        Assert.That(first.CachedPromptTokens, Is.Zero);
        // The same prompt on the base: the adapter's cached keys and values must not be read.
        var onBase = await server.GenerateAsync(new GenerationRequest(long1, null, MaxTokens: 4));
        Assert.That(onBase.CachedPromptTokens, Is.Zero, "another variant's prefix was reused");
        // The same variant, a prompt sharing only the system part: the match ends inside the first prompt's node.
        var second = await server.GenerateAsync(new GenerationRequest(System + "other", "a0", MaxTokens: 4));
        int bos = model.Tokenizer.EncodeStart("").Count;
        Assert.That(second.CachedPromptTokens, Is.EqualTo((bos + System.Length) / 4 * 4));
        var again = await server.GenerateAsync(new GenerationRequest(long1, "a0", MaxTokens: 4));
        Assert.That(again.CachedPromptTokens, Is.EqualTo((first.PromptTokens - 1) / 4 * 4));
        var expected = Alone(model, adapters, new[] { first.Request, onBase.Request, second.Request });
        Assert.That(new[] { first.Completion, onBase.Completion, second.Completion }, Is.EqualTo(expected));
        Assert.That(again.Completion, Is.EqualTo(first.Completion));
    }

    [TestCase(true)]
    [TestCase(false)]
    public async Task PrefillFirst_RunsAJoiningPromptAlone_OutputsUnchanged(bool prefillFirst)
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 27);
        var adapters = Adapters(model.Config, 2);
        // Chunks of 24 tokens: the 12-15-token prompts fit alone, two of them do not.
        using var server = new VariantServer(model, new VariantServerOptions { PrefillChunk = 24, PrefixCache = false, PrefillFirst = prefillFirst });
        foreach (var (name, a) in adapters) server.Load(name, a);
        var longOne = new GenerationRequest("a long answer", "a0", MaxTokens: 40);
        var joining = new[] { "first joiner", "second joiner!", "third joiner, a1" }.Select((p, i) => new GenerationRequest(p, i == 2 ? "a1" : null, MaxTokens: 5)).ToArray();
        var expected = Alone(model, adapters, joining.Prepend(longOne));

        var first = server.Start(longOne);
        await first.Text.ReadAsync(); // decoding now
        var tasks = joining.Select(r => server.GenerateAsync(r)).ToList();
        var results = await Task.WhenAll(tasks.Prepend(first.Result)).WaitAsync(Patience);
        Assert.That(results.Select(r => r.Completion), Is.EqualTo(expected));
        var stats = server.Stats;
        if (!prefillFirst)
        {
            Assert.That(stats.PrefillOnlySteps, Is.EqualTo(0));
            return;
        }

        // Some prompt ran alone while the long row waited (how many depends on when the scheduler saw each arrive: three
        // at most, two when they came together, as the three do not fit one 24-token chunk).
        Assert.That(stats.PrefillOnlySteps, Is.InRange(1, 3));
    }

    [Test]
    public async Task Streaming_PiecesMakeTheCompletion_StopTextsCutIt()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 23);
        using var server = new VariantServer(model);
        var plain = await server.GenerateAsync(new GenerationRequest("stream me", MaxTokens: 12));
        Assert.That(plain.Completion.Length, Is.GreaterThan(4));
        var pieces = new List<string>();
        await foreach (var piece in server.StreamAsync(new GenerationRequest("stream me", MaxTokens: 12))) pieces.Add(piece);
        Assert.That(string.Concat(pieces), Is.EqualTo(plain.Completion));
        Assert.That(pieces.Count, Is.GreaterThan(1), "text arrives as it is generated");

        string stop = plain.Completion.Substring(3, 2);
        int at = plain.Completion.IndexOf(stop, StringComparison.Ordinal);
        var cutRequest = new GenerationRequest("stream me", MaxTokens: 12) { Stop = new[] { stop } };
        var streamed = new List<string>();
        var handle = server.Start(cutRequest);
        await foreach (var piece in handle.Text.ReadAllAsync()) streamed.Add(piece);
        var cut = await handle.Result;
        Assert.That(cut.Completion, Is.EqualTo(plain.Completion[..at]));
        Assert.That(cut.FinishReason, Is.EqualTo("stop"));
        Assert.That(string.Concat(streamed), Is.EqualTo(cut.Completion), "held-back text that began the stop text is never sent");
        Assert.That(plain.FinishReason, Is.EqualTo("length"));
        Assert.That(BatchGenerator.Generate(model, new[] { cutRequest })[0].Completion, Is.EqualTo(cut.Completion), "the closed batch cuts the same way");
    }

    [Test]
    public async Task Cancellation_EndsOneRequest_OthersRunOn()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 29);
        using var server = new VariantServer(model);
        using var cts = new CancellationTokenSource();
        var handle = server.Start(new GenerationRequest("a long one", MaxTokens: 400), cts.Token);
        var other = server.GenerateAsync(new GenerationRequest("short", MaxTokens: 5));
        await handle.Text.ReadAsync(); // it is running
        cts.Cancel();
        Assert.That(async () => await handle.Result.WaitAsync(Patience), Throws.InstanceOf<OperationCanceledException>());
        var r = await other.WaitAsync(Patience);
        Assert.That(r.Completion, Is.EqualTo(Generator.Greedy(model, "short", 5)));
        await WaitUntil(() => server.Stats.Running == 0);
        Assert.That(server.Stats.KvBlocksUsed, Is.Zero, "the cancelled request's reservation is freed (both prompts are under one block, so nothing is cached)");
    }

    [Test]
    public async Task Adapters_UnknownFailsFast_UnloadWhileRunningFinishes_LoadedAgainIsNew()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 31);
        var adapters = Adapters(model.Config, 2);
        using var server = new VariantServer(model, new VariantServerOptions { MaxLoras = 1 });
        Assert.Throws<ArgumentException>(() => server.Start(new GenerationRequest("x", "nope")));
        server.Load("a0", adapters["a0"]);
        Assert.Throws<ArgumentException>(() => server.Load("a0", adapters["a1"]));
        var running = server.GenerateAsync(new GenerationRequest("unload me", "a0", MaxTokens: 30));
        Assert.That(server.Unload("a0"), Is.True);
        Assert.That(server.Unload("a0"), Is.False);
        Assert.Throws<ArgumentException>(() => server.Start(new GenerationRequest("x", "a0")));
        var done = await running.WaitAsync(Patience);
        Assert.That(done.Completion, Is.EqualTo(Alone(model, adapters, new[] { done.Request })[0]), "an accepted request finishes with its adapter");
        // The same name, other weights: the old one's cached prefixes must not serve it.
        server.Load("a0", adapters["a1"]);
        var reloaded = await server.GenerateAsync(new GenerationRequest("unload me", "a0", MaxTokens: 30));
        Assert.That(reloaded.CachedPromptTokens, Is.Zero);
        Assert.That(reloaded.Completion, Is.EqualTo(Alone(model, adapters, new[] { done.Request with { Variant = "a1" } })[0]));
        Assert.That(reloaded.Completion, Is.Not.EqualTo(done.Completion), "the adapters differ, so the check can fail");
    }

    [Test]
    public async Task KvBudget_QueuesWhatDoesNotFitYet_RefusesWhatNeverFits()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 37);
        // Room for about one request at a time (each reserves prompt + max tokens).
        using var server = new VariantServer(model, new VariantServerOptions { BlockSize = 4, KvBlocks = 12, PrefixCache = false });
        Assert.Throws<ArgumentException>(() => server.Start(new GenerationRequest("too long for the budget", MaxTokens: 40)));
        var requests = new[] { "one", "two", "three", "four" }.Select(p => new GenerationRequest(p, MaxTokens: 20)).ToArray();
        var results = await Task.WhenAll(requests.Select(r => server.GenerateAsync(r))).WaitAsync(Patience);
        Assert.That(results.Select(r => r.Completion), Is.EqualTo(requests.Select(r => Generator.Greedy(model, r.Prompt, 20))));
        Assert.That(server.Stats.KvBlocksUsed, Is.Zero);
    }

    [Test]
    public async Task Drain_FinishesAcceptedRequests_ThenRefusesNewOnes()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 41);
        var server = new VariantServer(model);
        var tasks = new[] { "a", "b", "c" }.Select(p => server.GenerateAsync(new GenerationRequest(p, MaxTokens: 6))).ToArray();
        await server.DrainAsync().WaitAsync(Patience);
        Assert.That(tasks.All(t => t.IsCompletedSuccessfully), Is.True);
        Assert.Throws<InvalidOperationException>(() => server.Start(new GenerationRequest("late")));
        server.Dispose();
    }

    [Test]
    public void Dispose_FailsUnfinishedRequests_ALaterCancellationIsHarmless()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 47);
        using var cts = new CancellationTokenSource();
        var server = new VariantServer(model);
        var handle = server.Start(new GenerationRequest("never finishes in time", MaxTokens: 400), cts.Token);
        server.Dispose();
        Assert.That(async () => await handle.Result.WaitAsync(Patience), Throws.InstanceOf<ObjectDisposedException>());
        Assert.DoesNotThrow(cts.Cancel);
        Assert.Throws<InvalidOperationException>(() => server.Start(new GenerationRequest("late")));
    }

    private static async Task WaitUntil(Func<bool> condition)
    {
        var until = DateTime.UtcNow + Patience;
        while (!condition())
        {
            if (DateTime.UtcNow > until) Assert.Fail("timed out waiting for the server");
            await Task.Delay(5);
        }
    }
}
