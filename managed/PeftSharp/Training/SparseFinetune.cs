using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>How a sparse fine-tune chooses its trainable entries.</summary>
public enum MaskSource
{
    /// <summary>Largest accumulated |gradient| over a few batches.</summary>
    Gradient,
    /// <summary>Largest |weight|.</summary>
    Weight,
    /// <summary>A seeded random subset.</summary>
    Random,
}

/// <summary>
/// Mask selection for sparse fine-tuning: per tensor, the top-density fraction of entries by a score (gradient
/// magnitude accumulated over batches, weight magnitude, or a seeded random draw), ties broken by position. Every
/// trainable parameter gets its share of the budget. Runs on the model's device (<see cref="Ops.AbsAdd"/> to
/// accumulate |gradient|, <see cref="Ops.SelectBand"/> to select); only the selected indices come back.
/// </summary>
public static class SparseMasks
{
    public static Dictionary<string, int[]> Select(LlamaModel model, double density, MaskSource source, int seed, IReadOnlyList<(int[] Ids, int[] Targets)>? batches = null, int batchSize = 1)
    {
        if (density is <= 0 or > 1) throw new ArgumentException($"density {density} must be in (0, 1]");
        var trainable = model.Parameters.Where(p => p.Trainable).ToList();
        var ops = model.Device.Ops;
        var grads = new Dictionary<string, Tensor>();
        try
        {
            if (source == MaskSource.Gradient)
            {
                if (batches == null || batches.Count == 0) throw new ArgumentException("gradient masks need batches to accumulate gradients over");
                foreach (var p in trainable) grads[p.Name] = model.Device.Zeros($"{p.Name}.|grad|", p.Value.Shape.ToArray());
                foreach (var (ids, targets) in batches)
                {
                    model.ZeroGrad();
                    model.Loss(ids, targets, batchSize, backward: true);
                    foreach (var p in trainable) ops.AbsAdd(p.Grad, grads[p.Name]);
                }

                model.ZeroGrad();
            }

            var masks = new Dictionary<string, int[]>();
            int tensor = 0;
            foreach (var p in trainable)
            {
                int n = p.Value.Length, keep = Math.Max(1, (int)Math.Round(density * n));
                masks[p.Name] = source switch
                {
                    MaskSource.Gradient => ops.SelectBand(grads[p.Name], 0, keep),
                    MaskSource.Weight => ops.SelectBand(p.Value, 0, keep),
                    _ => ops.SelectBand(p.Value, 0, keep, new SelectScore(SelectScore.Uniform, unchecked(seed * 7919 + tensor))),
                };
                tensor++;
            }

            return masks;
        }
        finally
        {
            foreach (var g in grads.Values) g.Dispose();
        }
    }
}

/// <summary>
/// AdamW that steps only the masked entries of each parameter (Ops.MaskedAdamW) and keeps moments for those entries
/// alone: optimizer memory is 2 x nnz floats, not 2 x the model. Parameters without a mask are not stepped.
/// (Gradients are still computed densely by the backward pass.)
/// </summary>
public sealed class MaskedAdamW : Optimizer
{
    private readonly Dictionary<Parameter, (IndexTensor Mask, Tensor M, Tensor V)> state = new();

    public MaskedAdamW(IEnumerable<Parameter> parameters, IReadOnlyDictionary<string, int[]> masks, float beta1 = 0.9f, float beta2 = 0.999f, float epsilon = 1e-8f, float weightDecay = 0f)
        : base(parameters.Where(p => masks.ContainsKey(p.Name)))
    {
        Beta1 = beta1;
        Beta2 = beta2;
        Epsilon = epsilon;
        WeightDecay = weightDecay;
        foreach (var p in Parameters)
        {
            var idx = masks[p.Name];
            var d = p.Value.Device;
            state[p] = (d.FromIndices(p.Name + ".mask", idx), d.Zeros(p.Name + ".exp_avg", Math.Max(1, idx.Length)), d.Zeros(p.Name + ".exp_avg_sq", Math.Max(1, idx.Length)));
        }
    }

    public float Beta1 { get; }
    public float Beta2 { get; }
    public float Epsilon { get; }
    public float WeightDecay { get; }

    /// <summary>Optimizer state in floats: two moments per masked entry.</summary>
    public long StateFloats => state.Values.Sum(s => 2L * s.Mask.Length);

    public override void Step(float learningRate)
    {
        StepCount++;
        foreach (var (p, (mask, m, v)) in state)
        {
            if (!p.Trainable || mask.Length == 0) continue;
            p.Value.Device.Ops.MaskedAdamW(p.Value, p.Grad, mask, m, v,
                new AdamWStep(learningRate * LearningRateScale(p.Name), Beta1, Beta2, Epsilon, WeightDecay, StepCount));
        }
    }

    /// <summary>The current mask of each parameter.</summary>
    public IReadOnlyDictionary<string, int[]> Masks => state.ToDictionary(s => s.Key.Name, s => s.Value.Mask.Values.ToArray());

    /// <summary>
    /// Swaps a parameter's mask: entries that stay keep their moments, new entries start at zero (SpIEL's regrowth).
    /// </summary>
    public void Replace(Parameter p, int[] mask)
    {
        if (!state.TryGetValue(p, out var old)) throw new ArgumentException($"{p.Name} has no mask in this optimizer");
        var d = p.Value.Device;
        var oldIdx = old.Mask.Values.ToArray();
        var oldM = old.M.ToArray();
        var oldV = old.V.ToArray();
        var at = new Dictionary<int, int>();
        for (int j = 0; j < oldIdx.Length; j++) at[oldIdx[j]] = j;
        var sorted = mask.OrderBy(i => i).ToArray();
        int n = Math.Max(1, sorted.Length);
        var m = new float[n];
        var v = new float[n];
        for (int j = 0; j < sorted.Length; j++)
        {
            if (at.TryGetValue(sorted[j], out int k))
            {
                m[j] = oldM[k];
                v[j] = oldV[k];
            }
        }

        old.Mask.Dispose();
        old.M.Dispose();
        old.V.Dispose();
        state[p] = (d.FromIndices(p.Name + ".mask", sorted), d.FromArray(p.Name + ".exp_avg", m, n), d.FromArray(p.Name + ".exp_avg_sq", v, n));
    }

    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState()
    {
        foreach (var (p, (_, m, v)) in state)
        {
            yield return (p.Name + ".exp_avg", m.ToArray(), m.Shape.ToArray());
            yield return (p.Name + ".exp_avg_sq", v.ToArray(), v.Shape.ToArray());
        }
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var (p, (_, m, v)) in state)
        {
            foreach (var (suffix, t) in new[] { (".exp_avg", m), (".exp_avg_sq", v) })
            {
                if (read(p.Name + suffix) is not { } values) continue;
                if (values.Length != t.Length) throw new InvalidDataException($"{p.Name}{suffix}: the checkpoint holds {values.Length} values, the mask has {t.Length} entries (was the mask restored first?)");
                t.CopyFrom(values);
            }
        }
    }

    public override void ResetState(IEnumerable<Parameter> reset)
    {
        foreach (var p in reset)
        {
            if (state.TryGetValue(p, out var s))
            {
                p.Value.Device.Ops.Fill(s.M, 0f);
                p.Value.Device.Ops.Fill(s.V, 0f);
            }
        }
    }

    public override void Dispose()
    {
        foreach (var (mask, m, v) in state.Values)
        {
            mask.Dispose();
            m.Dispose();
            v.Dispose();
        }

        state.Clear();
    }
}

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
        if (!file.Contains(name)) throw new InvalidDataException($"{file.Path}: no '{name}'; the checkpoint was written without --regrow-every or for another model");
        var values = ints ? file.ReadInts(name).Select(v => (float)v).ToArray() : file.ReadFloats(name);
        if (values.Length != length) throw new InvalidDataException($"{file.Path}: '{name}' has {values.Length} values, this run needs {length}");
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

/// <summary>
/// A sparse fine-tune's checkpoint state (sparse_state.safetensors): each parameter's mask ("{name}.mask", Int32)
/// and, under SpIEL regrowth, the regrow state. Restored before the optimizer's moments, which follow the masks.
/// </summary>
public sealed class SparseState : ICheckpointState
{
    public const string FileName = "sparse_state.safetensors";

    private readonly MaskedAdamW optimizer;
    private readonly SparseRegrow? regrow;

    public SparseState(MaskedAdamW optimizer, SparseRegrow? regrow)
    {
        this.optimizer = optimizer;
        this.regrow = regrow;
    }

    public string File => FileName;

    public IEnumerable<SafeTensorData> Export()
    {
        foreach (var (name, mask) in optimizer.Masks) yield return SafeTensorData.Int32(name + ".mask", mask, new[] { mask.Length });
        if (regrow != null)
        {
            foreach (var t in regrow.Export()) yield return t;
        }
    }

    public void Import(SafeTensorsFile file)
    {
        var masks = ReadMasks(file, optimizer.Parameters.Select(p => p.Name));
        foreach (var p in optimizer.Parameters) optimizer.Replace(p, masks[p.Name]);
        regrow?.Import(file, masks);
    }

    /// <summary>The masks a checkpoint was trained with (to build the optimizer of a resumed run).</summary>
    public static Dictionary<string, int[]> ReadMasks(string checkpoint)
    {
        string path = System.IO.Path.Combine(checkpoint, FileName);
        if (!System.IO.File.Exists(path)) throw new InvalidDataException($"{checkpoint}: no {FileName}; not a sparse fine-tune's checkpoint");
        using var file = SafeTensorsFile.Open(path);
        return ReadMasks(file, file.Tensors.Select(t => t.Name).Where(n => n.EndsWith(".mask", StringComparison.Ordinal)).Select(n => n[..^5]));
    }

    private static Dictionary<string, int[]> ReadMasks(SafeTensorsFile file, IEnumerable<string> names) =>
        names.ToDictionary(n => n, n => file.Contains(n + ".mask")
            ? file.ReadInts(n + ".mask")
            : throw new InvalidDataException($"{file.Path}: no mask for {n}"));
}
