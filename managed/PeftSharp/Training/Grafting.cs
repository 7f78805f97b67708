using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Training;

/// <summary>
/// Skill localization by grafting (Panigrahi et al., 2023): find a sparse mask gamma within a budget such that
/// theta = theta_base + gamma * (theta_fine - theta_base) keeps the fine-tune's task performance. Scores S start at
/// |theta_fine - theta_base| (the largest changes); each step grafts the top budget fraction of S over the whole model,
/// takes the task loss's gradient g with respect to the grafted weights, and moves the scores against the
/// straight-through estimate dL/dS = g * (theta_fine - theta_base) (an entry helps when grafting it lowers the loss).
/// The final mask is the top of S. The budget is a fraction of all parameters, shared across tensors by score.
/// Host-side over all entries at once: meant for the model sizes PeftSharp trains here.
/// </summary>
public static class Grafting
{
    public static GraftResult Localize(LlamaModel baseModel, LlamaModel fine, IReadOnlyList<(int[] Ids, int[] Targets)> batches, int batchSize,
        double budget, int steps, float learningRate = 0.5f, Action<int, double>? progress = null)
    {
        if (budget is <= 0 or > 1) throw new ArgumentException($"budget {budget} must be in (0, 1]");
        if (batches.Count == 0) throw new ArgumentException("grafting needs task batches");
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        var names = baseModel.Parameters.Select(p => p.Name).ToArray();
        var b = names.ToDictionary(n => n, n => baseModel[n].Value.ToArray());
        var delta = names.ToDictionary(n => n, n =>
        {
            var f = fine[n].Value.ToArray();
            var d = b[n];
            return f.Select((v, i) => v - d[i]).ToArray();
        });
        var score = names.ToDictionary(n => n, n => delta[n].Select(v => (double)Math.Abs(v)).ToArray());
        long total = names.Sum(n => (long)b[n].Length);
        int keep = (int)Math.Max(1, Math.Round(budget * total));
        using var graft = LlamaModel.FromTensors(baseModel.Device, baseModel.Config, (n, _) => b[n]);
        double LossOf(Dictionary<string, int[]> mask, bool backward)
        {
            foreach (var n in names)
            {
                var w = (float[])b[n].Clone();
                foreach (int i in mask[n]) w[i] += delta[n][i];
                graft[n].Value.CopyFrom(w);
            }

            graft.ZeroGrad();
            double sum = 0;
            foreach (var (ids, targets) in batches) sum += graft.Loss(ids, targets, batchSize, backward).Loss;
            return sum / batches.Count;
        }

        var mask = TopMask(score, keep);
        double before = LossOf(mask, backward: false);
        for (int step = 1; step <= steps; step++)
        {
            double loss = LossOf(mask, backward: true);
            // Scale-free steps: the estimate g * delta is normalised by its RMS and moves scores by learningRate times
            // their mean size, so the rate does not depend on how large the weights or the loss are.
            var gd = names.ToDictionary(n => n, n =>
            {
                var g = graft[n].Grad.ToArray();
                var d = delta[n];
                return g.Select((v, i) => (double)v * d[i]).ToArray();
            });
            double rms = Math.Sqrt(gd.Values.Sum(a => a.Sum(v => v * v)) / total);
            double meanScore = score.Values.Sum(a => a.Sum()) / total;
            if (rms == 0) break;
            foreach (var n in names)
            {
                var s = score[n];
                var e = gd[n];
                for (int i = 0; i < s.Length; i++) s[i] -= learningRate * meanScore * e[i] / rms;
            }

            mask = TopMask(score, keep);
            progress?.Invoke(step, loss);
        }

        double after = LossOf(mask, backward: false);
        var entries = names.Where(n => mask[n].Length > 0).ToDictionary(n => n, n => (mask[n], mask[n].Select(i => delta[n][i]).ToArray()));
        return new GraftResult(new SparseDelta(entries, PeftSharp.Compression.BitDelta.Fingerprint(baseModel)), keep, (double)keep / total, before, after);
    }

    /// <summary>The <paramref name="keep"/> highest scores over all tensors (ties by tensor order and position), per tensor, sorted.</summary>
    private static Dictionary<string, int[]> TopMask(Dictionary<string, double[]> score, int keep)
    {
        var all = score.SelectMany(kv => kv.Value.Select((v, i) => (Name: kv.Key, Index: i, Score: v)))
            .OrderByDescending(e => e.Score).Take(keep).ToList();
        return score.Keys.ToDictionary(n => n, n => all.Where(e => e.Name == n).Select(e => e.Index).OrderBy(i => i).ToArray());
    }
}
