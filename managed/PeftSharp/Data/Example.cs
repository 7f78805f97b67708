namespace PeftSharp.Data;

/// <summary>A prompt and the completion the model should produce. Loss on fine-tuning data covers the completion.</summary>
public sealed record Example(string Task, string Prompt, string Completion)
{
    /// <summary>
    /// A window of token ids already cut from a document (<see cref="DataFiles.Windows"/>): every next token in it is
    /// trained on, nothing is added around it. Null for examples whose strings are tokenized as [BOS] prompt
    /// completion [EOS].
    /// </summary>
    public int[]? Ids { get; init; }

    /// <summary>Whether a prompt asks for the completion, so exact match means something (a document window does not).</summary>
    public bool HasPrompt => Ids == null && Prompt.Length > 0;
}
