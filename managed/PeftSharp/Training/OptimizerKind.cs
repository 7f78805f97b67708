namespace PeftSharp.Training;

/// <summary>The optimizer a run steps with (sparse fine-tuning always uses the masked AdamW).</summary>
public enum OptimizerKind
{
    AdamW,
    Sgd,
}
