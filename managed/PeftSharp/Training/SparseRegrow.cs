using PeftSharp.Engine;
using PeftSharp.Formats;

namespace PeftSharp.Training;

/// <summary>
/// SpIEL-style periodic drop and regrow for sparse fine-tuning at a fixed budget: after every step the gradient
/// magnitudes are accumulated (on the device, <see cref="Ops.AbsAdd"/>); every <see cref="Every"/> steps each
/// parameter drops the <see cref="DropFraction"/> of its masked entries whose change from the start is smallest
/// (resetting them to their starting value) and grows as many new entries where the accumulated gradient is largest
/// (ties by lower index), so the count stays the same. Entries outside the mask never change, so the starting values
/// are kept for the masked entries only; the work at a regrow moves O(nnz) values, never a whole tensor.
/// </summary>
public sealed class SparseRegrow : IDisposable
{
    private readonly MaskedAdamW optimizer;
    private readonly Dictionary<string, float[]> start = new();        // start value of each masked entry, in mask order
    private readonly Dictionary<string, Tensor> accumulated = new();   // sum of |gradient| over steps since the last regrow

    public SparseRegrow(MaskedAdamW optimizer, int every, float dropFraction = 0.2f)
    {
        if (every <= 0) throw new ArgumentException($"regrow interval {every} must be positive");
        if (dropFraction is <= 0f or > 1f) throw new ArgumentException($"drop fraction {dropFraction} must be in (0, 1]");
        this.optimizer = optimizer;
        Every = every;
        DropFraction = dropFraction;
        var masks = optimizer.Masks;
        foreach (var p in optimizer.Parameters)
        {
            start[p.Name] = Gather(p.Value, masks[p.Name]);
            accumulated[p.Name] = p.Value.Device.Zeros(p.Name + ".grad_acc", p.Value.Shape.ToArray());
        }
    }

    public int Every { get; }

    public float DropFraction { get; }

    /// <summary>Entries swapped so far.</summary>
    public long Regrown { get; private set; }

    /// <summary>Call after each optimizer step (the step's gradients are still in Grad).</summary>
    public void AfterStep(int step)
    {
        foreach (var p in optimizer.Parameters) p.Value.Device.Ops.AbsAdd(p.Grad, accumulated[p.Name]);
        if (step % Every != 0) return;
        var masks = optimizer.Masks;
        foreach (var p in optimizer.Parameters)
        {
            var mask = masks[p.Name];
            int drop = (int)Math.Round(DropFraction * mask.Length);
            if (drop == 0) continue;
            var ops = p.Value.Device.Ops;
            var acc = accumulated[p.Name];
            var w0 = start[p.Name];
            var w = Gather(p.Value, mask);
            var droppedAt = Enumerable.Range(0, mask.Length).OrderBy(j => Math.Abs(w[j] - w0[j])).ThenBy(j => mask[j]).Take(drop).OrderBy(j => mask[j]).ToArray();
            Scatter(p.Value, droppedAt.Select(j => mask[j]).ToArray(), droppedAt.Select(j => w0[j]).ToArray());

            // Grow where the accumulated gradient is largest outside the mask: the masked entries' sums are cleared,
            // so they rank after every positive sum; among the best drop + nnz candidates, the first drop by rank
            // that are not masked win.
            Scatter(acc, mask, new float[mask.Length]);
            var candidates = ops.SelectBand(acc, 0, Math.Min(acc.Length, drop + mask.Length));
            var score = Gather(acc, candidates);
            var inMask = mask.ToHashSet();
            var grown = Enumerable.Range(0, candidates.Length).Where(j => !inMask.Contains(candidates[j]))
                .OrderByDescending(j => score[j]).ThenBy(j => candidates[j]).Take(drop).Select(j => candidates[j]).ToArray();

            var dropped = droppedAt.Select(j => mask[j]).ToHashSet();
            var kept = Enumerable.Range(0, mask.Length).Where(j => !dropped.Contains(mask[j])).ToArray();
            var grownStart = Gather(p.Value, grown); // never trained, so still at its start value
            var next = kept.Select(j => (Index: mask[j], Start: w0[j])).Concat(grown.Select((i, g) => (Index: i, Start: grownStart[g]))).OrderBy(e => e.Index).ToArray();
            optimizer.Replace(p, next.Select(e => e.Index).ToArray());
            start[p.Name] = next.Select(e => e.Start).ToArray();
            ops.Fill(acc, 0f);
            Regrown += grown.Length;
        }
    }

    /// <summary>The state a checkpoint needs to continue the schedule: start values (mask order), gradient sums, swaps so far.</summary>
    internal IEnumerable<SafeTensorData> Export()
    {
        foreach (var p in optimizer.Parameters)
        {
            yield return new SafeTensorData(p.Name + ".start", start[p.Name], new[] { start[p.Name].Length });
            yield return new SafeTensorData(p.Name + ".grad_acc", accumulated[p.Name].ToArray(), accumulated[p.Name].Shape.ToArray());
        }

        yield return SafeTensorData.Int32("regrown", new[] { (int)Math.Min(int.MaxValue, Regrown) }, new[] { 1 });
    }

    internal void Import(SafeTensorsFile file, IReadOnlyDictionary<string, int[]> masks)
    {
        foreach (var p in optimizer.Parameters)
        {
            var s = Read(file, p.Name + ".start", masks[p.Name].Length);
            var a = Read(file, p.Name + ".grad_acc", p.Value.Length);
            start[p.Name] = s;
            accumulated[p.Name].CopyFrom(a);
        }

        Regrown = Read(file, "regrown", 1, ints: true)[0] is var r ? (long)r : 0;
    }

    private static float[] Read(SafeTensorsFile file, string name, int length, bool ints = false)
    {
        if (!file.Contains(name)) throw new PeftSharpInputException($"{file.Path}: no '{name}'; the checkpoint was written without --regrow-every or for another model");
        var values = ints ? file.ReadInts(name).Select(v => (float)v).ToArray() : file.ReadFloats(name);
        if (values.Length != length) throw new PeftSharpInputException($"{file.Path}: '{name}' has {values.Length} values, this run needs {length}");
        return values;
    }

    private static float[] Gather(Tensor t, int[] idx)
    {
        if (idx.Length == 0) return Array.Empty<float>();
        var d = t.Device;
        using var it = d.FromIndices(t.Name + ".gather", idx);
        using var values = d.Zeros(t.Name + ".gathered", idx.Length);
        d.Ops.Gather(t, it, values);
        return values.ToArray();
    }

    private static void Scatter(Tensor t, int[] idx, float[] values)
    {
        if (idx.Length == 0) return;
        var d = t.Device;
        using var it = d.FromIndices(t.Name + ".scatter", idx);
        using var vt = d.FromArray(t.Name + ".scattered", values, values.Length);
        d.Ops.Scatter(t, it, vt);
    }

    public void Dispose()
    {
        foreach (var t in accumulated.Values) t.Dispose();
        accumulated.Clear();
    }
}
