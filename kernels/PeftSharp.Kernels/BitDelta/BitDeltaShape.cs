namespace PeftSharp.Kernels.BitDelta;

/// <summary>
/// Dimensions of a 1-bit delta batch, passed to kernels by value. A sign matrix S (N, K) of +-1 is packed along K into
/// W = ceil(K / 32) 32-bit words per row: bit j of word w of row n is 1 when the delta at (n, 32 w + j) is positive
/// (S = +1), 0 otherwise (S = -1); bits past K are 0 and never read. A pool holds slots of such matrices, each with
/// one fp32 scale; variant v owns rounds[v] consecutive slots from first[v] (residual rounds: delta ~ sum_j a_j S_j).
/// </summary>
public readonly struct BitDeltaShape
{
    public BitDeltaShape(int rows, int inFeatures, int outFeatures)
    {
        M = rows;
        K = inFeatures;
        N = outFeatures;
        W = WordsPerRow(inFeatures);
    }

    /// <summary>Rows in the batch.</summary>
    public int M { get; }
    /// <summary>Input features.</summary>
    public int K { get; }
    /// <summary>Output features.</summary>
    public int N { get; }
    /// <summary>Packed 32-bit words per output row: ceil(K / 32).</summary>
    public int W { get; }

    public static int WordsPerRow(int k) => (k + 31) / 32;
}
