namespace PeftSharp.Data;

/// <summary>A prompt and the completion the model should produce. Loss on fine-tuning data covers the completion.</summary>
public sealed record Example(string Task, string Prompt, string Completion);
