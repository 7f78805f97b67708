namespace PeftSharp.Training;

/// <summary>How a sparse fine-tune chooses its trainable entries.</summary>
public enum MaskSource
{
    /// <summary>Largest accumulated |gradient| over a few batches.</summary>
    Gradient,
    /// <summary>Largest |weight|.</summary>
    Weight,
    /// <summary>A seeded random subset.</summary>
    Random,
}
