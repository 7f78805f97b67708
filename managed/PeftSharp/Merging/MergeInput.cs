namespace PeftSharp.Merging;

/// <summary>One input's options (mergekit's per-model parameters).</summary>
public sealed record MergeInput(float Weight = 1f, float Density = 1f, float Gamma = 0.01f)
{
    /// <summary>DELLA's epsilon: keep probabilities spread over density +- epsilon by magnitude rank (mergekit's default 0.15).</summary>
    public float Epsilon { get; init; } = 0.15f;
}
