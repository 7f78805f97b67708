using PeftSharp.Variants;

namespace PeftSharp.Training;

/// <summary>What skill localization found: the grafted entries (as a sparse delta), the density, and the loss along the way.</summary>
public sealed record GraftResult(SparseDelta Delta, long Entries, double Density, double LossBefore, double LossAfter);
