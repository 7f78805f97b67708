namespace PeftSharp.Training;

/// <summary>Held-out numbers: mean loss per trained token, perplexity, and exact-match accuracy of greedy completions.</summary>
public sealed record EvalResult(double Loss, double Perplexity, double ExactMatch, int Examples);
