namespace PeftSharp.Serving;

/// <summary>What a request produced: its completion and the number of tokens generated.</summary>
public sealed record GenerationResult(GenerationRequest Request, string Completion, int Tokens)
{
    /// <summary>Prompt tokens ([BOS] and told prefixes included).</summary>
    public int PromptTokens { get; init; }

    /// <summary>Prompt tokens whose keys and values came from a cache instead of being computed for this request.</summary>
    public int CachedPromptTokens { get; init; }

    /// <summary>Why it ended, as OpenAI names it: "stop" (EOS, a stop token or a stop text) or "length" (max tokens or the context).</summary>
    public string FinishReason { get; init; } = "length";

    /// <summary>Each generated token's log probability and alternatives when the request asked (<see cref="GenerationRequest.TopLogprobs"/>); else null.</summary>
    public IReadOnlyList<TokenLogprob>? Logprobs { get; init; }

    /// <summary>The prompt tokens' log probabilities when the request asked (<see cref="GenerationRequest.PromptLogprobs"/>): null for the first token.</summary>
    public IReadOnlyList<TokenLogprob?>? PromptLogprobs { get; init; }

    /// <summary>The prompt's token ids, given with <see cref="PromptLogprobs"/> (the first one has no log probability).</summary>
    public IReadOnlyList<int>? PromptTokenIds { get; init; }

    /// <summary>From submission to admission into the running batch (<see cref="VariantServer"/>; zero for a closed batch).</summary>
    public TimeSpan QueueTime { get; init; }

    /// <summary>From submission to the first generated token (<see cref="VariantServer"/>; zero for a closed batch), before any text it holds back.</summary>
    public TimeSpan TimeToFirstToken { get; init; }
}
