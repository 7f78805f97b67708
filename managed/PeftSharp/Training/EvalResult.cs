namespace PeftSharp.Training;

/// <summary>What <see cref="Evaluator.Evaluate"/> measured over <paramref name="Examples"/> examples.</summary>
/// <param name="ExactMatch">Share of the <see cref="Matched"/> examples (those with a prompt) whose greedy completion was exact.</param>
public sealed record EvalResult(double Loss, double Perplexity, double ExactMatch, int Examples)
{
    /// <summary>Examples exact match was scored on (those with a prompt); 0 for document windows.</summary>
    public int Matched { get; init; } = Examples;
}
