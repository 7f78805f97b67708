namespace PeftSharp.Kernels.Lora;

/// <summary>
/// Dimensions of a mixed-adapter LoRA batch, passed to kernels by value. Adapters live in one pool:
/// A_a (R_a, K) row-major at aOffsets[a] of the A pool, B_a (N, R_a) row-major at bOffsets[a] of the B pool, with
/// rank R_a and scale s_a. Row i of the batch uses adapter rowAdapter[i], or none when it is -1.
/// </summary>
public readonly struct LoraBatchShape
{
    public LoraBatchShape(int rows, int inFeatures, int outFeatures, int maxRank)
    {
        M = rows;
        K = inFeatures;
        N = outFeatures;
        RMax = maxRank;
    }

    /// <summary>Rows in the batch.</summary>
    public int M { get; }
    /// <summary>Input features.</summary>
    public int K { get; }
    /// <summary>Output features.</summary>
    public int N { get; }
    /// <summary>Largest rank in the pool: the width of the shrink buffer t (M, RMax).</summary>
    public int RMax { get; }
}
