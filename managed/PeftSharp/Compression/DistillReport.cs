namespace PeftSharp.Compression;

/// <summary>What scale distillation did: the logit error on held-out calibration batches before and after.</summary>
public sealed record DistillReport(double LogitMseBefore, double LogitMseAfter, int Steps, BitDelta Delta);
