namespace PeftSharp.Serving;

/// <summary>Bounds of a <see cref="VariantServer"/>: rows per step, resident variants, KV memory and prefill chunking.</summary>
public sealed record VariantServerOptions
{
    /// <summary>Requests decoding at once (rows of a decode step); the rest wait in the queue.</summary>
    public int MaxRows { get; init; } = 32;

    /// <summary>Variants resident in the device pools at once (vLLM's max_loras); the others stay in host memory, least recently used first out.</summary>
    public int MaxLoras { get; init; } = 8;

    /// <summary>Positions per KV block: the unit of KV accounting and of prefix-cache reuse.</summary>
    public int BlockSize { get; init; } = 16;

    /// <summary>KV blocks in all (requests' reservations and cached prefixes); 0: a quarter of the device's memory.</summary>
    public int KvBlocks { get; init; }

    /// <summary>Prompt tokens prefilled per step over all prefilling requests, so a long prompt does not stall decoding rows.</summary>
    public int PrefillChunk { get; init; } = 256;

    /// <summary>
    /// Whether prompt work that fits one step's <see cref="PrefillChunk"/> runs alone, the decoding rows waiting (for at
    /// most one chunk's worth of prompt tokens before they decode again): a joining request's first token then costs a
    /// prefill step, not a prefill plus every running row's decode. Long prompts still run in chunks beside the decoding
    /// rows. Off: every step decodes every running row beside the prefill chunks.
    /// </summary>
    public bool PrefillFirst { get; init; } = true;

    /// <summary>Whether prompts' whole blocks are cached and reused by later requests of the same variant.</summary>
    public bool PrefixCache { get; init; } = true;

    /// <summary>Requests queued behind the running ones before new ones are refused.</summary>
    public int MaxWaiting { get; init; } = 4096;

    internal void Check()
    {
        if (MaxRows < 1 || MaxLoras < 1 || BlockSize < 1 || KvBlocks < 0 || PrefillChunk < 1 || MaxWaiting < 0)
        {
            throw new ArgumentException($"server options out of range: {this}");
        }
    }
}

/// <summary>
/// A snapshot of a <see cref="VariantServer"/> after its last step: what Prometheus' /metrics reports, under vLLM's
/// names where they exist (running and waiting requests, KV block usage, running and waiting adapters, max_lora).
/// </summary>
public sealed record ServerStats(
    int Running,
    int Waiting,
    int KvBlocksUsed,
    int KvBlocks,
    IReadOnlyList<string> RunningAdapters,
    IReadOnlyList<string> WaitingAdapters,
    int MaxLoras,
    IReadOnlyList<string> ResidentAdapters,
    long PromptTokens,
    long GenerationTokens,
    long CachedPromptTokens,
    long FinishedRequests,
    long Steps)
{
    /// <summary>Steps that ran prefill alone while rows waited to decode (<see cref="VariantServerOptions.PrefillFirst"/>).</summary>
    public long PrefillOnlySteps { get; init; }

    /// <summary>Finished requests' times from submission to their first token (vllm:time_to_first_token_seconds).</summary>
    public LatencyHistogram TimeToFirstToken { get; init; } = LatencyHistogram.Empty(LatencyHistogram.FirstTokenBounds);

    /// <summary>Finished requests' times in the queue before admission (vllm:request_queue_time_seconds).</summary>
    public LatencyHistogram QueueTime { get; init; } = LatencyHistogram.Empty(LatencyHistogram.RequestBounds);

    /// <summary>Finished requests' times from submission to completion (vllm:e2e_request_latency_seconds).</summary>
    public LatencyHistogram EndToEnd { get; init; } = LatencyHistogram.Empty(LatencyHistogram.RequestBounds);

    /// <summary>KV blocks in use, 0 to 1 (vLLM's gpu_cache_usage_perc).</summary>
    public double KvUsage => KvBlocks == 0 ? 0 : (double)KvBlocksUsed / KvBlocks;
}
