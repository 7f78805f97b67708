using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Engine;

public sealed partial class Ops
{
    /// <summary>
    /// AdamW over the masked entries of p only: p[idx[j]] with gradient g[idx[j]] and moments m[j], v[j] (nnz each),
    /// so optimizer state grows with the mask, not the tensor. Every other entry of p is left bit-identical.
    /// </summary>
    public void MaskedAdamW(Tensor p, Tensor g, IndexTensor idx, Tensor m, Tensor v, AdamWStep step)
    {
        CheckMask("masked adamw", p, idx);
        SameShape("masked adamw", p, g);
        Check("masked adamw", m, v);
        Expect("masked adamw", m, idx.Length, $"(nnz = {idx.Length}) for mask {idx}");
        Expect("masked adamw", v, idx.Length, $"(nnz = {idx.Length}) for mask {idx}");
        if (idx.Length > 0) device.MaskedAdamWCore(p, g, idx, m, v, step);
    }

    /// <summary>SGD over the masked entries of p; <paramref name="momentum"/> buffer (nnz) when step.Momentum is not 0.</summary>
    public void MaskedSgd(Tensor p, Tensor g, IndexTensor idx, Tensor? momentum, SgdStep step)
    {
        CheckMask("masked sgd", p, idx);
        SameShape("masked sgd", p, g);
        if (step.Nesterov) throw new NotSupportedException("masked sgd: Nesterov momentum is not implemented");
        if (step.Momentum != 0f)
        {
            if (momentum == null) throw new ArgumentException("masked sgd: momentum is not 0 but no buffer was given");
            Expect("masked sgd", momentum, idx.Length, $"(nnz = {idx.Length})");
        }

        if (idx.Length > 0) device.MaskedSgdCore(p, g, idx, momentum, step);
    }

    /// <summary>w[idx[j]] += alpha * values[j]: applies (alpha 1) or removes (alpha -1) a sparse delta in place.</summary>
    public void ScatterAdd(Tensor w, IndexTensor idx, Tensor values, float alpha = 1f)
    {
        CheckMask("scatter add", w, idx);
        Check("scatter add", values);
        Expect("scatter add", values, idx.Length, $"(nnz = {idx.Length}) for indices {idx}");
        if (idx.Length > 0) device.ScatterAddCore(w, idx, values, alpha);
    }

    /// <summary>w[idx[j]] = values[j]: sets the indexed entries (restoring dropped entries, clearing them).</summary>
    public void Scatter(Tensor w, IndexTensor idx, Tensor values)
    {
        CheckMask("scatter", w, idx);
        Check("scatter", values);
        Expect("scatter", values, idx.Length, $"(nnz = {idx.Length}) for indices {idx}");
        if (idx.Length > 0) device.ScatterCore(w, idx, values);
    }

    /// <summary>values[j] = w[idx[j]].</summary>
    public void Gather(Tensor w, IndexTensor idx, Tensor values)
    {
        CheckMask("gather", w, idx, distinct: false);
        Check("gather", values);
        Expect("gather", values, idx.Length, $"(nnz = {idx.Length}) for indices {idx}");
        if (idx.Length > 0) device.GatherCore(w, idx, values);
    }

    /// <summary>
    /// DARE drop-and-rescale: y = x / (1 - p) where a counter-based uniform draw for (seed, element) is at least p,
    /// else 0; deterministic for a seed on every backend. p = 0 copies x exactly. y may alias x.
    /// </summary>
    public void Dare(Tensor x, Tensor y, float p, int seed)
    {
        SameShape("dare", x, y);
        if (p is < 0f or >= 1f || float.IsNaN(p)) throw new ArgumentException($"dare: drop probability {p} must be in [0, 1)");
        if (x.Length > 0) device.DareCore(x, y, p, seed);
    }

    /// <summary>y (M, N) += each row's sparse delta applied to x (M, K): rows with variant -1 are untouched.</summary>
    public void SparseDeltaMixed(Tensor x, Tensor y, SparseDeltaPool pool, IndexTensor rowVariants)
    {
        int rows = CheckMixed("sparse mixed", "variant", x, y, pool.Device, pool.InFeatures, pool.OutFeatures, pool.Count, rowVariants);

        if (pool.Count > 0 && rows > 0 && pool.OutFeatures > 0) device.SparseDeltaMixedCore(x, y, pool, rowVariants, rows);
    }

    /// <summary>acc += |x| elementwise (accumulating gradient magnitudes for a mask).</summary>
    public void AbsAdd(Tensor x, Tensor acc)
    {
        SameShape("abs add", x, acc);
        if (x.Length > 0) device.AbsAddCore(x, acc);
    }

    /// <summary>
    /// Mask selection: the indices, ascending, of the entries of x whose rank by score (largest first, ties broken by
    /// the lower index) is in [<paramref name="skip"/>, skip + <paramref name="count"/>). Score |x| gives top-k by
    /// magnitude (skip 0), both tails dropped (skip = the largest fraction to drop), or, with
    /// <see cref="SelectScore.Uniform"/>, a seeded random subset. Runs on the device (radix select on the score's
    /// bits, no sort); only 256 counts per pass, per-chunk counts and the result come back. NaN ranks above +inf.
    /// </summary>
    public int[] SelectBand(Tensor x, int skip, int count, SelectScore score = default)
    {
        Check("select band", x);
        if (score.Mode is not (SelectScore.Magnitude or SelectScore.Uniform)) throw new ArgumentException($"select band: score mode {score.Mode} is neither Magnitude " +
            $"({SelectScore.Magnitude}) nor Uniform ({SelectScore.Uniform})");
        if (skip < 0 || count < 0 || (long)skip + count > x.Length)
        {
            throw new ArgumentException($"select band: ranks [{skip}, {(long)skip + count}) do not fit in {x} (length {x.Length})");
        }

        if (count == 0) return Array.Empty<int>();
        int chunk = Math.Max(1024, (x.Length + 4095) / 4096);
        uint keyLo = RadixSelect(x, score, skip, chunk, out int aboveLo);
        uint keyHi = RadixSelect(x, score, skip + count - 1, chunk, out int aboveHi);
        var band = new SelectBand { KeyLo = keyLo, KeyHi = keyHi, LoStart = skip - aboveLo, HiEnd = skip + count - aboveHi, Chunk = chunk, Length = x.Length };
        return device.SelectWriteCore(x, score, band, count);
    }

    /// <summary>The key of the entry at <paramref name="rank"/> (0 = largest), and how many keys are larger.</summary>
    private uint RadixSelect(Tensor x, SelectScore score, int rank, int chunk, out int above)
    {
        uint prefix = 0, mask = 0;
        above = 0;
        for (int shift = 24; shift >= 0; shift -= 8)
        {
            var hist = device.SelectHistogramCore(x, score, prefix, mask, shift, chunk);
            int digit = 0;
            for (int b = SelectKernels.Bins - 1; b >= 0; b--)
            {
                if (above + hist[b] > rank)
                {
                    digit = b;
                    break;
                }

                above += hist[b];
            }

            prefix |= (uint)digit << shift;
            mask |= 0xFFu << shift;
        }

        return prefix;
    }

    private void CheckMask(string op, Tensor t, IndexTensor idx, bool distinct = true)
    {
        Check(op, t);
        CheckIndex(op, idx);
        var host = idx.Host;
        var seen = distinct ? new HashSet<int>() : null;
        foreach (int i in host)
        {
            if (i < 0 || i >= t.Length) throw new ArgumentException($"{op}: index {i} in {idx} is outside {t} (length {t.Length})");
            if (seen != null && !seen.Add(i)) throw new ArgumentException($"{op}: index {i} appears twice in {idx}; a mask's indices must be distinct");
        }
    }
}

/// <summary>
/// The host's part of a band selection between the device's two chunk passes: from each chunk's counts (keys equal
/// to KeyLo, equal to KeyHi, strictly between), the running totals each chunk starts from, and how many it keeps.
/// </summary>
internal static class SelectPlan
{
    /// <summary>before[3c .. 3c+2] = equal-to-KeyLo and equal-to-KeyHi entries in earlier chunks, and kept entries in earlier chunks.</summary>
    public static int[] Before(ReadOnlySpan<int> counts, SelectBand band, int expected)
    {
        int chunks = counts.Length / 3;
        var before = new int[counts.Length];
        int lo = 0, hi = 0, kept = 0;
        for (int c = 0; c < chunks; c++)
        {
            before[3 * c] = lo;
            before[3 * c + 1] = hi;
            before[3 * c + 2] = kept;
            int eqLo = counts[3 * c], eqHi = counts[3 * c + 1], between = counts[3 * c + 2];
            if (band.KeyLo == band.KeyHi)
            {
                kept += Overlap(lo, lo + eqLo, band.LoStart, band.HiEnd);
            }
            else
            {
                kept += between + Overlap(lo, lo + eqLo, band.LoStart, int.MaxValue) + Overlap(hi, hi + eqHi, 0, band.HiEnd);
            }

            lo += eqLo;
            hi += eqHi;
        }

        if (kept != expected) throw new InvalidOperationException($"select band: the chunks keep {kept} entries, expected {expected} (the scores changed during the selection?)");
        return before;
    }

    private static int Overlap(int a0, int a1, int b0, int b1) => Math.Max(0, Math.Min(a1, b1) - Math.Max(a0, b0));
}
