namespace PeftSharp.Training;

/// <summary>Learning rate as a function of the (0-based) step.</summary>
public abstract record LearningRateSchedule(float PeakLearningRate)
{
    public abstract float At(int step);

    public sealed record Constant(float LearningRate) : LearningRateSchedule(LearningRate)
    {
        public override float At(int step) => PeakLearningRate;
    }

    /// <summary>Linear warmup from 0, then cosine (or linear) decay to <paramref name="MinLearningRate"/> at <paramref name="TotalSteps"/>.</summary>
    public sealed record Warmup(float LearningRate, int WarmupSteps, int TotalSteps, bool Cosine = true, float MinLearningRate = 0f)
        : LearningRateSchedule(LearningRate)
    {
        public override float At(int step)
        {
            if (step < WarmupSteps) return PeakLearningRate * (step + 1) / WarmupSteps;
            if (TotalSteps <= WarmupSteps) return PeakLearningRate;
            double progress = Math.Clamp((double)(step - WarmupSteps) / (TotalSteps - WarmupSteps), 0, 1);
            double shape = Cosine ? 0.5 * (1 + Math.Cos(Math.PI * progress)) : 1 - progress;
            return (float)(MinLearningRate + (PeakLearningRate - MinLearningRate) * shape);
        }
    }
}
