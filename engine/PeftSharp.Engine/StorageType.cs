namespace PeftSharp.Engine;

/// <summary>
/// Storage precisions of checkpoint files. Compute is always fp32: fp16 and bf16 data convert on load (exactly: both
/// are subsets of fp32) and round to nearest-even on save.
/// </summary>
public enum StorageType
{
    F32,
    F16,
    BF16,
}
