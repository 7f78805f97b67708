namespace PeftSharp.Serving;

/// <summary>What a request produced: its completion and the number of tokens generated.</summary>
public sealed record GenerationResult(GenerationRequest Request, string Completion, int Tokens);
