using System.Diagnostics;
using System.Threading.Channels;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Serving;

/// <summary>
/// Continuous batching over many variants of one base model. Requests arrive from any thread; one scheduler thread
/// runs model steps, and at every step boundary it retires finished rows, admits waiting requests (bounded by
/// <see cref="VariantServerOptions.MaxRows"/> and the KV block budget) and gives each step one token per decoding row
/// plus up to <see cref="VariantServerOptions.PrefillChunk"/> prompt tokens of prefilling rows, every row with its own
/// variant (a <see cref="VariantSet"/> batch). Loaded variants stay in host memory; at most
/// <see cref="VariantServerOptions.MaxLoras"/> are resident in the device pools, the least recently used idle one
/// leaving when another is needed. A prompt's whole blocks are cached (<see cref="PrefixCacheStore"/>) and reused by
/// later requests of the same variant load: the key includes the variant, since a variant changes the keys and values
/// from the first layer on. KV memory is reserved per request at admission for its prompt and max tokens (no
/// preemption); each request's own cache is contiguous (blocks are the unit of accounting and reuse, not of storage).
/// A request's output equals the same request generated alone (its own seeded sampler; fp32 rounding aside).
/// </summary>
public sealed partial class VariantServer : IDisposable
{
    private readonly LlamaModel model;
    private readonly VariantServerOptions options;
    private readonly VariantSet set;
    private readonly Lock gate = new();
    private readonly Dictionary<string, Entry> registry = new();
    private readonly Queue<Job> incoming = new();
    private readonly List<Job> waiting = new();
    private readonly List<Job> running = new();
    private readonly Dictionary<Entry, long> resident = new();
    private readonly PrefixCacheStore prefixes;
    private readonly HashSet<int> stopTokens;
    private readonly Thread loop;
    private readonly SemaphoreSlim wake = new(0);
    private readonly TaskCompletionSource drained = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private long nextId;
    private long tick;
    private long promptTokens, generationTokens, cachedTokens, finished, steps, prefillOnlySteps;

    /// <summary>The most alternatives a request may ask for per token (OpenAI's bound).</summary>
    public const int MaxTopLogprobs = 20;

    /// <summary>Latencies of finished requests, for /metrics (replaced, never mutated, so a snapshot can share them).</summary>
    private LatencyHistogram firstTokenTimes = LatencyHistogram.Empty(LatencyHistogram.FirstTokenBounds),
        queueTimes = LatencyHistogram.Empty(LatencyHistogram.RequestBounds), endToEndTimes = LatencyHistogram.Empty(LatencyHistogram.RequestBounds);

    /// <summary>Prompt tokens run in prefill-only steps since the decoding rows last decoded (prefill first).</summary>
    private int prefilledSinceDecode;
    private bool accepting = true;
    private bool aborting;
    private ServerStats stats;

    public VariantServer(LlamaModel model, VariantServerOptions? options = null)
    {
        this.model = model;
        this.options = options ?? new VariantServerOptions();
        this.options.Check();
        set = new VariantSet(model);
        stopTokens = model.StopTokens.ToHashSet();
        if (model.Tokenizer.Eos is int eos) stopTokens.Add(eos);
        var c = model.Config;
        int blocks = this.options.KvBlocks;
        if (blocks == 0)
        {
            long blockBytes = ModelMemory.KvCacheBytes(c, this.options.BlockSize);
            long have = model.Device.Info.MemoryBytes > 0 ? model.Device.Info.MemoryBytes / 4 : 1L << 30;
            blocks = (int)Math.Clamp(have / blockBytes, 1, int.MaxValue);
        }

        KvBlocks = blocks;
        prefixes = new PrefixCacheStore(this.options.BlockSize, this.options.PrefixCache && c.AttentionWindow == 0);
        stats = Snapshot();
        loop = new Thread(Run) { IsBackground = true, Name = "PeftSharp VariantServer" };
        loop.Start();
    }

    /// <summary>The model served.</summary>
    public LlamaModel Model => model;

    /// <summary>KV blocks in all (<see cref="VariantServerOptions.KvBlocks"/>, or the derived default).</summary>
    public int KvBlocks { get; }

    public VariantServerOptions Options => options;

    /// <summary>The state after the last step (requests, KV usage, adapters, token counts).</summary>
    public ServerStats Stats
    {
        get
        {
            lock (gate) return stats;
        }
    }

    /// <summary>Names of the loaded variants (resident or not), in load order.</summary>
    public IReadOnlyList<string> Variants
    {
        get
        {
            lock (gate) return registry.Values.OrderBy(e => e.Id).Select(e => e.Name).ToArray();
        }
    }

    /// <summary>
    /// Loads a variant under <paramref name="name"/> (into host memory; resident when first requested). It is checked
    /// at once against the model (kind, shapes, the base's fingerprint), so a variant that cannot be served fails here.
    /// </summary>
    public void Load(string name, IVariant variant)
    {
        if (string.IsNullOrWhiteSpace(name) || name == "base") throw new ArgumentException($"'{name}' cannot name a variant ('base' means no variant)");
        using (var probe = new VariantSet(model)) probe.Add(name, variant);
        lock (gate)
        {
            if (registry.ContainsKey(name)) throw new ArgumentException($"a variant named '{name}' is already loaded");
            registry[name] = new Entry(name, variant, ++nextId);
        }
    }

    /// <summary>
    /// Unloads a variant: new requests for it fail at once; requests already accepted finish with it, and its device
    /// copy and cached prefixes go when the last of them ends. False when no variant has that name.
    /// </summary>
    public bool Unload(string name)
    {
        lock (gate)
        {
            if (!registry.Remove(name, out var e)) return false;
            e.Unloaded = true;
        }

        Wake();
        return true;
    }

    /// <summary>Whether <paramref name="name"/> is the base ("base", null or empty) or a loaded variant.</summary>
    public bool Knows(string? name)
    {
        if (string.IsNullOrEmpty(name) || name == "base") return true;
        lock (gate) return registry.ContainsKey(name);
    }

    /// <summary>Generates one request; the task ends with its result, or cancelled by <paramref name="cancel"/>.</summary>
    public Task<GenerationResult> GenerateAsync(GenerationRequest request, CancellationToken cancel = default) => Start(request, cancel).Result;

    /// <summary>Generates one request as a stream of text pieces (their concatenation is the completion).</summary>
    public IAsyncEnumerable<string> StreamAsync(GenerationRequest request, CancellationToken cancel = default) => Start(request, cancel).Text.ReadAllAsync(cancel);

    /// <summary>
    /// Queues a request and returns its text stream and result together. Fails at once (ArgumentException) for an
    /// unknown variant, a prompt past the context or a request that could never fit the KV budget; InvalidOperation
    /// when the server is shutting down or the queue is full.
    /// </summary>
    public ServerRequest Start(GenerationRequest request, CancellationToken cancel = default)
    {
        var (tokens, _) = BatchGenerator.Tokenize(model, request, "request");
        if (request.TopLogprobs is < 0 or > MaxTopLogprobs) throw new ArgumentException($"top logprobs {request.TopLogprobs} is outside [0, {MaxTopLogprobs}]");
        if (request.PromptLogprobs && request.TopLogprobs == null) throw new ArgumentException("prompt log probabilities need TopLogprobs (0 for none of the alternatives)");
        int reserve = Blocks(Math.Min(model.Config.ContextLimit, tokens.Length + request.MaxTokens));
        if (reserve > KvBlocks) throw new ArgumentException($"request needs {reserve} KV blocks of {options.BlockSize} positions; the server has {KvBlocks}");
        var job = new Job(request, tokens, cancel);
        lock (gate)
        {
            if (!accepting) throw new InvalidOperationException("the server is shutting down");
            if (!string.IsNullOrEmpty(request.Variant) && request.Variant != "base")
            {
                job.Entry = registry.TryGetValue(request.Variant, out var e)
                    ? e
                    : throw new ArgumentException($"no variant named '{request.Variant}' is loaded (loaded: base{string.Concat(registry.Keys.Select(k => ", " + k))})");
                if (job.Entry.Variant is PeftLoraAdapter { Config: { AloraInvocationTokens: { } invocation } config })
                {
                    job.ActiveFrom = config.InvocationStart(tokens);
                    if (job.ActiveFrom < 0) throw new ArgumentException(BatchGenerator.NoInvocation("request", request.Variant, invocation));
                }
            }

            if (incoming.Count + waiting.Count >= options.MaxWaiting) throw new InvalidOperationException($"the queue is full ({options.MaxWaiting} waiting requests)");
            incoming.Enqueue(job);
        }

        if (cancel.CanBeCanceled) job.Registration = cancel.Register(Wake);
        Wake();
        return new ServerRequest(job.Text.Reader, job.Done.Task);
    }

    /// <summary>Stops accepting requests and completes when every accepted one has finished (a graceful shutdown).</summary>
    public Task DrainAsync()
    {
        lock (gate) accepting = false;
        Wake();
        return drained.Task;
    }

    /// <summary>Stops at once: accepted requests that have not finished fail (ObjectDisposedException); device memory is freed.</summary>
    public void Dispose()
    {
        lock (gate)
        {
            if (aborting) return;
            accepting = false;
            aborting = true;
        }

        Wake();
        loop.Join();
        lock (gate)
        {
            // Queued between the loop's last look and its exit.
            while (incoming.Count > 0) incoming.Dequeue().Fail(new ObjectDisposedException(nameof(VariantServer)));
        }

        prefixes.Dispose();
        set.Dispose();
        wake.Dispose();
    }

    /// <summary>Wakes the scheduler; after <see cref="Dispose"/> there is none to wake (a late cancellation lands here).</summary>
    private void Wake()
    {
        try
        {
            wake.Release();
        }
        catch (ObjectDisposedException)
        {
        }
    }

    private int Blocks(int positions) => (positions + options.BlockSize - 1) / options.BlockSize;

    private void Run()
    {
        while (true)
        {
            bool abort;
            lock (gate)
            {
                while (incoming.Count > 0) waiting.Add(incoming.Dequeue());
                abort = aborting;
                if (!accepting && waiting.Count == 0 && running.Count == 0) drained.TrySetResult();
            }

            if (abort)
            {
                foreach (var job in waiting.Concat(running).ToList()) Fail(job, new ObjectDisposedException(nameof(VariantServer)));
                drained.TrySetResult();
                return;
            }

            long finishedBefore = finished;
            RetireCancelled();
            Admit();
            if (running.Count > 0)
            {
                try
                {
                    Step();
                }
                catch (Exception ex)
                {
                    // A step that fails fails the requests in it (they cannot continue from half a step); the server goes on.
                    foreach (var job in running.ToList()) Fail(job, ex);
                    prefixes.DropUnready();
                }
            }

            lock (gate) stats = Snapshot();
            // A request that ended this step woke its client on another thread; on a machine whose cores all run the
            // step's workers that thread may not get one before the next step starts, so its follow-up request would
            // wait a whole step. Yielding once lets it run and join the next step.
            if (finished != finishedBefore) Thread.Yield();
            if (running.Count == 0) wake.Wait(waiting.Count > 0 ? 20 : Timeout.Infinite); // waiting on memory or adapters: look again soon
        }
    }

    private void RetireCancelled()
    {
        foreach (var job in waiting.Concat(running).Where(j => j.Cancel.IsCancellationRequested).ToList())
        {
            Finish(job, () =>
            {
                job.Done.TrySetCanceled(job.Cancel);
                job.Text.Writer.TryComplete(new OperationCanceledException(job.Cancel));
            });
        }
    }

    private void Fail(Job job, Exception ex) => Finish(job, () =>
    {
        job.Done.TrySetException(ex);
        job.Text.Writer.TryComplete(ex);
    });

    /// <summary>Frees what the request holds (its cache, its hold on a cached prefix) and ends it with <paramref name="complete"/>.</summary>
    private void Finish(Job job, Action complete)
    {
        waiting.Remove(job);
        if (running.Remove(job))
        {
            job.Cache?.Dispose();
            job.Cache = null;
            if (job.Prefix != null) prefixes.Release(job.Prefix, ++tick);
            if (job.Entry != null) resident[job.Entry] = ++tick;
        }

        job.Registration.Dispose();
        complete();
        finished++;
    }

    private ServerStats Snapshot() => new(
        running.Count,
        waiting.Count + incoming.Count,
        running.Sum(j => j.Blocks) + prefixes.Blocks,
        KvBlocks,
        running.Where(j => j.Entry != null).Select(j => j.Entry!.Name).Distinct().ToArray(),
        waiting.Concat(incoming).Where(j => j.Entry != null).Select(j => j.Entry!.Name).Distinct().ToArray(),
        options.MaxLoras,
        resident.Keys.Select(e => e.Name).ToArray(),
        promptTokens,
        generationTokens,
        cachedTokens,
        finished,
        steps) { PrefillOnlySteps = prefillOnlySteps, TimeToFirstToken = firstTokenTimes, QueueTime = queueTimes, EndToEnd = endToEndTimes };

    /// <summary>A loaded variant: its name, its data in host memory and the id that keys its cached prefixes and its device copy.</summary>
    private sealed class Entry(string name, IVariant variant, long id)
    {
        public string Name { get; } = name;

        public IVariant Variant { get; } = variant;

        public long Id { get; } = id;

        /// <summary>Its name in the device pools: unique per load, so a variant loaded again under the same name is a new one.</summary>
        public string Key => $"{Name}#{Id}";

        public bool Unloaded { get; set; }
    }

    private sealed class Job(GenerationRequest request, int[] prompt, CancellationToken cancel)
    {
        public GenerationRequest Request { get; } = request;

        /// <summary>The prompt's tokens (T).</summary>
        public int[] Prompt { get; } = prompt;

        public CancellationToken Cancel { get; } = cancel;

        public CancellationTokenRegistration Registration { get; set; }

        public Entry? Entry { get; set; }

        public TaskCompletionSource<GenerationResult> Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Channel<string> Text { get; } = Channel.CreateUnbounded<string>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });

        public KvCache? Cache { get; set; }

        /// <summary>The cached prefix this request reads (its cache continues it), or null.</summary>
        public PrefixCacheStore.Node? Prefix { get; set; }

        /// <summary>Prompt positions covered so far (the cached prefix's and those prefilled into its own cache).</summary>
        public int Fed { get; set; }

        /// <summary>The last sampled token, fed at the next step.</summary>
        public int Next { get; set; } = -1;

        public List<int> Output { get; } = new();

        /// <summary>Each output token's log probability, when the request asked for them.</summary>
        public List<TokenLogprob> Logprobs { get; } = new();

        /// <summary>Each prompt token's log probability (the first null), when the request asked to score its prompt.</summary>
        public List<TokenLogprob?> PromptLogprobs { get; } = new() { null };

        public Random Rng { get; } = new(request.Seed);

        public int Emitted { get; set; }

        public int Blocks { get; set; }

        public int CachedTokens { get; set; }

        /// <summary>
        /// The first prompt position its variant adapts: an activated LoRA's invocation start (earlier positions are the
        /// base's, and come from and go to the base's cached prefixes); 0 for every other request.
        /// </summary>
        public int ActiveFrom { get; set; }

        /// <summary>Stopwatch timestamps: queued, admitted, first token sampled (0 until then).</summary>
        public long Submitted { get; } = Stopwatch.GetTimestamp();

        public long Admitted { get; set; }

        public long FirstToken { get; set; }

        /// <summary>Ends a request that never reached the scheduler.</summary>
        public void Fail(Exception ex)
        {
            Registration.Dispose();
            Done.TrySetException(ex);
            Text.Writer.TryComplete(ex);
        }
    }
}

/// <summary>A queued request: its text as it is generated, and its result.</summary>
public sealed record ServerRequest(ChannelReader<string> Text, Task<GenerationResult> Result);
