namespace PeftSharp.Kernels.Sparse;

/// <summary>
/// Where a selection's score comes from: <see cref="Magnitude"/> = |x[i]|, <see cref="Uniform"/> = the counter-based
/// draw <see cref="SparseKernels.Uniform"/>(seed, i) (x is not read): a seeded random mask.
/// </summary>
public struct SelectScore
{
    public const int Magnitude = 0;
    public const int Uniform = 1;

    public int Mode;
    public int Seed;

    public SelectScore(int mode, int seed)
    {
        Mode = mode;
        Seed = seed;
    }
}
