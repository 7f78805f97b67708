using ILGPU;
using ILGPU.Algorithms;

namespace PeftSharp.Kernels.Sparse;

/// <summary>
/// Mask selection on the device without sorting and without atomics: the keys are the score's float bits (a
/// non-negative float's bits order like the float), so the key at a given rank is found by a radix select, 8 bits per
/// pass (<see cref="HistogramKernel"/> per chunk, <see cref="HistogramSumKernel"/> over the chunks); then each chunk
/// counts its entries equal to the two boundary keys and strictly between them (<see cref="CountKernel"/>), and, with
/// the host's running totals, writes the kept indices in ascending order (<see cref="WriteKernel"/>). NaN scores rank
/// above +inf. Reference: <see cref="SelectReference"/>.
/// </summary>
public static class SelectKernels
{
    public const int Bins = 256;

    /// <summary>The sort key of entry i: the bits of its non-negative score.</summary>
    public static uint Key(ArrayView<float> x, int i, SelectScore score) =>
        score.Mode == SelectScore.Uniform
            ? (uint)Interop.FloatAsInt(SparseKernels.Uniform(score.Seed, i))
            : (uint)Interop.FloatAsInt(x[i]) & 0x7FFFFFFFu;

    /// <summary>hist[c * 256 + digit] = entries of chunk c whose key matches prefix under prefixMask, by the digit at shift.</summary>
    public static void HistogramKernel(
        Index1D c,
        ArrayView<float> x,     // (numel) scores
        ArrayView<int> hist,    // (chunks * 256)
        SelectScore score, uint prefix, uint prefixMask, int shift, int chunk, int length)
    {
        int baseBin = c * Bins;
        for (int b = 0; b < Bins; b++) hist[baseBin + b] = 0;
        int end = XMath.Min(length, (c + 1) * chunk);
        for (int i = c * chunk; i < end; i++)
        {
            uint key = Key(x, i, score);
            if ((key & prefixMask) == prefix) hist[baseBin + (int)((key >> shift) & 0xFFu)]++;
        }
    }

    /// <summary>total[b] = sum over chunks of hist[c * 256 + b]. One thread per bin.</summary>
    public static void HistogramSumKernel(Index1D b, ArrayView<int> hist, ArrayView<int> total, int chunks)
    {
        int sum = 0;
        for (int c = 0; c < chunks; c++) sum += hist[c * Bins + b];
        total[b] = sum;
    }

    /// <summary>counts[3c .. 3c+2] = chunk c's entries with key == KeyLo, key == KeyHi, and KeyHi &lt; key &lt; KeyLo.</summary>
    public static void CountKernel(Index1D c, ArrayView<float> x, ArrayView<int> counts, SelectScore score, SelectBand band)
    {
        int eqLo = 0, eqHi = 0, between = 0;
        int end = XMath.Min(band.Length, (c + 1) * band.Chunk);
        for (int i = c * band.Chunk; i < end; i++)
        {
            uint key = Key(x, i, score);
            if (key == band.KeyLo) eqLo++;
            if (key == band.KeyHi) eqHi++;
            if (key > band.KeyHi && key < band.KeyLo) between++;
        }

        counts[3 * c] = eqLo;
        counts[3 * c + 1] = eqHi;
        counts[3 * c + 2] = between;
    }

    /// <summary>
    /// Writes chunk c's kept indices at output[before[3c + 2] ...] in ascending order; before[3c], before[3c + 1] are
    /// the entries equal to KeyLo / KeyHi in earlier chunks (exclusive running totals of <see cref="CountKernel"/>'s
    /// counts, the third being the kept entries of earlier chunks).
    /// </summary>
    public static void WriteKernel(Index1D c, ArrayView<float> x, ArrayView<int> before, ArrayView<int> output, SelectScore score, SelectBand band)
    {
        int posLo = before[3 * c], posHi = before[3 * c + 1], at = before[3 * c + 2];
        int end = XMath.Min(band.Length, (c + 1) * band.Chunk);
        for (int i = c * band.Chunk; i < end; i++)
        {
            uint key = Key(x, i, score);
            bool keep;
            if (key == band.KeyLo || key == band.KeyHi)
            {
                keep = true;
                if (key == band.KeyLo)
                {
                    keep = posLo >= band.LoStart;
                    posLo++;
                }

                if (key == band.KeyHi)
                {
                    keep = keep && posHi < band.HiEnd;
                    posHi++;
                }
            }
            else
            {
                keep = key > band.KeyHi && key < band.KeyLo;
            }

            if (keep) output[at++] = i;
        }
    }
}
