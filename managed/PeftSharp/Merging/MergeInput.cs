namespace PeftSharp.Merging;

/// <summary>One input's options (mergekit's per-model parameters).</summary>
public sealed record MergeInput(float Weight = 1f, float Density = 1f, float Gamma = 0.01f);
