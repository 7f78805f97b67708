using PeftSharp.Engine;
using PeftSharp.Kernels.Sparse;
using PeftSharp.Model;

namespace PeftSharp.Training;

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
