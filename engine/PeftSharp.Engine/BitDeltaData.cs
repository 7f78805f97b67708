namespace PeftSharp.Engine;

/// <summary>
/// One variant's 1-bit delta for a linear layer (N, K): one or more rounds, each a packed sign matrix (N, W) with its
/// scale, so the delta is sum_j Scales[j] * S_j (one round is BitDelta; more are residual rounds).
/// </summary>
public sealed record BitDeltaData(string Name, IReadOnlyList<int[]> Signs, IReadOnlyList<float> Scales);
