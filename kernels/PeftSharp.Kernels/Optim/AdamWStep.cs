namespace PeftSharp.Kernels.Optim;

/// <summary>Hyper-parameters of one AdamW step; bias corrections come from the step number (1-based).</summary>
public readonly record struct AdamWStep(float LearningRate, float Beta1, float Beta2, float Epsilon, float WeightDecay, int Step)
{
    /// <summary>1 - beta1^step.</summary>
    public float BiasCorrection1 => (float)(1.0 - Math.Pow(Beta1, Step));

    /// <summary>1 - beta2^step.</summary>
    public float BiasCorrection2 => (float)(1.0 - Math.Pow(Beta2, Step));
}
