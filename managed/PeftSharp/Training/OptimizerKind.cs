namespace PeftSharp.Training;

/// <summary>The optimizer a run steps with (sparse fine-tuning always uses the masked AdamW).</summary>
public enum OptimizerKind
{
    AdamW,
    Sgd,

    /// <summary>GaLore: AdamW with the moments in a rank-r projection of each matrix's gradient (<see cref="GaLoreAdamW"/>).</summary>
    GaLore,
}
