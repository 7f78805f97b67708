namespace PeftSharp.Training;

/// <summary>
/// Training was cancelled (Ctrl-C, SIGTERM, or the caller's token) and stopped at a step boundary: the step in flight
/// finished, a checkpoint of it was written to <see cref="Checkpoint"/> (when the run has an output folder), and no
/// final model was written. Resume from the checkpoint to go on.
/// </summary>
public sealed class TrainingInterruptedException(int step, int steps, string? checkpoint)
    : OperationCanceledException($"training interrupted after step {step} of {steps}" + (checkpoint != null ? $"; checkpoint written to {checkpoint}" : "; no output folder, nothing saved"))
{
    /// <summary>Steps completed.</summary>
    public int Step { get; } = step;

    /// <summary>The checkpoint folder written at the interruption, or null without an output folder.</summary>
    public string? Checkpoint { get; } = checkpoint;
}
