namespace PeftSharp.Serving;

/// <summary>
/// One generation request: a prompt, the variant that serves it (null: the base model) and its sampling.
/// <paramref name="SharedPrefix"/>, when given, is text that precedes the prompt and that every request with the same
/// shared prefix and variant reads from one copy of its keys and values. <paramref name="SharedPrefixes"/> gives a
/// chain of them instead (a tree across requests: system prompt, then a few-shot block, ...), root first.
/// </summary>
public sealed record GenerationRequest(string Prompt, string? Variant = null, int MaxTokens = 32, float Temperature = 0f, int TopK = 0, float TopP = 1f, int Seed = 0,
    string? SharedPrefix = null, IReadOnlyList<string>? SharedPrefixes = null)
{
    /// <summary>Texts that end the completion where they first appear (the completion is cut before it), as OpenAI's <c>stop</c>.</summary>
    public IReadOnlyList<string> Stop { get; init; } = Array.Empty<string>();

    /// <summary>
    /// Whether the tokenizer's BOS starts the prompt (default). A prompt rendered from a chat template carries its own
    /// special tokens and is tokenized without (as Hugging Face's apply_chat_template and vLLM do).
    /// </summary>
    public bool AddBos { get; init; } = true;

    /// <summary>
    /// The prompt as token ids, used exactly as given (no BOS is added; <see cref="Prompt"/> and the told prefixes must
    /// be empty), as OpenAI's and vLLM's completions take a list of token ids for a prompt. Null: tokenize the text.
    /// </summary>
    public IReadOnlyList<int>? PromptTokens { get; init; }

    /// <summary>
    /// Null: no log probabilities. Otherwise each generated token's log probability and this many (0-20) likeliest
    /// alternatives are returned in <see cref="GenerationResult.Logprobs"/> (<see cref="VariantServer"/> only).
    /// </summary>
    public int? TopLogprobs { get; init; }

    /// <summary>
    /// With <see cref="TopLogprobs"/>: also score the prompt, each prompt token's log probability given the tokens
    /// before it (<see cref="GenerationResult.PromptLogprobs"/>; the first token has none), as OpenAI's echo with
    /// logprobs reports it and evaluation harnesses read it (max tokens may then be 0). Its prompt is computed whole, not
    /// read from the prefix cache.
    /// </summary>
    public bool PromptLogprobs { get; init; }

    /// <summary>The told prefix levels, root first.</summary>
    public IReadOnlyList<string> PrefixLevels => SharedPrefixes ?? (SharedPrefix != null ? new[] { SharedPrefix } : Array.Empty<string>());
}
