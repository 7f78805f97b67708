using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Compression;

/// <summary>
/// ComPEFT (Yadav et al., 2023): a task vector tau = fine - base compressed by keeping its top-k entries by magnitude
/// (k = ceil(density n) per tensor) and replacing each kept entry by its sign times one magnitude per tensor,
/// alpha x mean |tau| over the kept entries (alpha 1 is the single magnitude closest to them in L2; the paper tunes
/// a multiple of the tensor's standard deviation on validation data, which the alpha argument stands in for).
/// The result is a <see cref="SparseDelta"/> whose values are +-scale: merged, or served in the mixed batch by the
/// sparse-delta pools like any sparse delta.
/// </summary>
public static class ComPeft
{
    /// <summary>Compresses every parameter of <paramref name="fine"/> that differs from <paramref name="baseModel"/>.</summary>
    public static SparseDelta Compress(LlamaModel baseModel, LlamaModel fine, double density, float alpha = 1f)
    {
        if (density is <= 0 or > 1) throw new ArgumentException($"ComPEFT density {density}: must be in (0, 1]");
        if (!(alpha > 0f) || !float.IsFinite(alpha)) throw new ArgumentException($"ComPEFT alpha {alpha}: must be positive and finite");
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        var entries = new Dictionary<string, (int[], float[])>();
        foreach (var p in baseModel.Parameters)
        {
            var b = p.Value.ToArray();
            var f = fine[p.Name].Value.ToArray();
            var tau = f.Select((v, i) => (double)v - b[i]).ToArray();
            if (tau.All(t => t == 0)) continue;
            entries[p.Name] = Ternarize(tau, density, alpha);
        }

        return new SparseDelta(entries, BitDelta.Fingerprint(baseModel)) { Method = "compeft" };
    }

    /// <summary>
    /// One tensor's ComPEFT form: the indices of its ceil(density n) largest |tau| (ties to the lower index, zeros never
    /// kept), in index order, each valued sign(tau) x alpha x mean |tau| over them.
    /// </summary>
    public static (int[] Index, float[] Values) Ternarize(double[] tau, double density, float alpha)
    {
        int k = (int)Math.Min(tau.Length, Math.Ceiling(density * tau.Length));
        var kept = Enumerable.Range(0, tau.Length).Where(i => tau[i] != 0).OrderByDescending(i => Math.Abs(tau[i])).ThenBy(i => i).Take(k).OrderBy(i => i).ToArray();
        if (kept.Length == 0) return (Array.Empty<int>(), Array.Empty<float>());
        double scale = alpha * kept.Average(i => Math.Abs(tau[i]));
        return (kept, kept.Select(i => (float)(Math.Sign(tau[i]) * scale)).ToArray());
    }

    /// <summary>
    /// The bytes of the ternary payload: per kept entry one sign bit and its position as a gap coded in
    /// ceil(log2(1 / density)) + 1 bits (Golomb-like), plus one fp32 scale per tensor: what a packed ComPEFT file would
    /// hold (PeftSharp's sparse-delta folder stores a 4-byte index and a 4-byte value per entry instead).
    /// </summary>
    public static long TernaryBytes(SparseDelta delta, double density)
    {
        int positionBits = (int)Math.Ceiling(Math.Log2(1 / density)) + 1;
        return (long)Math.Ceiling(delta.Nonzeros * (1.0 + positionBits) / 8) + 4L * delta.Entries.Count;
    }
}
