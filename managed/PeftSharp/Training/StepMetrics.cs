namespace PeftSharp.Training;

/// <summary>One optimizer step's numbers, also written as a line of metrics.jsonl.</summary>
public sealed record StepMetrics(int Step, double Loss, double GradNorm, float LearningRate, double TokensPerSecond, double ElapsedSeconds);
