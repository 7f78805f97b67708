namespace PeftSharp.Training;

/// <summary>
/// Training stopped at the first step whose loss or gradient norm was NaN or infinite, before that step updated the
/// weights: the model, its checkpoints and metrics hold only finite steps. Lower the learning rate, clip gradients, or
/// set <see cref="TrainOptions.SkipNonFinite"/> to skip such steps.
/// </summary>
public sealed class TrainingDivergedException(int step, double loss, double gradNorm)
    : Exception($"training diverged at step {step}: loss {loss}, gradient norm {gradNorm} (the weights are those after step {step - 1}); " +
        "lower the learning rate, clip gradients, or skip such steps (--skip-nonfinite)")
{
    /// <summary>The step (1-based) whose loss or gradient norm was not finite.</summary>
    public int Step { get; } = step;
}
