using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Compression;

/// <summary>
/// BitDelta's scale distillation: with the base, the sign bits and every other parameter frozen, train only the
/// per-matrix scales so the compressed model's logits match the fine-tuned model's (mean squared error over all
/// logits) on calibration batches. The gradient of a scale is dL/dalpha_j = sum(dL/dW * S_j), taken from the weight
/// gradient of the merged weight W = W_base + sum_j alpha_j S_j. Adam with a step relative to each scale's starting
/// value (a learning rate of 0.02 moves a scale by about 2% per step at most), since scales span orders of magnitude.
/// </summary>
public static class ScaleDistillation
{
    public static DistillReport Run(
        BitDelta delta, LlamaModel baseModel, LlamaModel fine,
        IReadOnlyList<int[]> trainBatches, IReadOnlyList<int[]> evalBatches, int batchSize, int steps,
        float learningRate = 0.02f, Action<int, double>? progress = null)
    {
        if (steps < 0) throw new ArgumentException($"distillation steps {steps} must be >= 0");
        if (steps > 0 && trainBatches.Count == 0) throw new ArgumentException("scale distillation needs calibration batches");
        if (!ReferenceEquals(baseModel.Device, fine.Device)) throw new ArgumentException("the base and fine-tuned models must live on one device");
        var device = baseModel.Device;
        var ops = device.Ops;
        using var student = LlamaModel.FromTensors(device, baseModel.Config, (name, _) => baseModel[name].Value.ToArray());
        delta.MergeInto(student);
        foreach (var p in student.Parameters) p.Trainable = false;
        foreach (var module in delta.Modules.Keys) student[module + ".weight"].Trainable = true;

        var teacher = new Dictionary<int[], float[]>(ReferenceEqualityComparer.Instance);
        float[] Teacher(int[] tokens) => teacher.TryGetValue(tokens, out var t) ? t : teacher[tokens] = fine.Logits(tokens, batchSize);
        double Error() => evalBatches.Count == 0 ? double.NaN : evalBatches.Average(b => student.LogitMse(b, batchSize, Teacher(b), backward: false));

        double before = Error();
        if (steps == 0) return new DistillReport(before, before, 0, delta);

        var modules = delta.Modules.ToDictionary(m => m.Key, m => m.Value);
        var scales = modules.ToDictionary(m => m.Key, m => (float[])m.Value.Scales.Clone());
        var start = modules.ToDictionary(m => m.Key, m => (float[])m.Value.Scales.Clone());
        var adamM = modules.ToDictionary(m => m.Key, m => new double[m.Value.Rounds]);
        var adamV = modules.ToDictionary(m => m.Key, m => new double[m.Value.Rounds]);
        var pools = new Dictionary<string, BitDeltaPool>();
        const double beta1 = 0.9, beta2 = 0.999, eps = 1e-12;
        try
        {
            foreach (var (module, m) in modules)
            {
                var w = student[module + ".weight"].Value;
                pools[module] = BitDeltaPool.Create(device, w.Dim(1), w.Dim(0), new[] { m.ToPoolData(module) });
            }

            for (int step = 1; step <= steps; step++)
            {
                var tokens = trainBatches[(step - 1) % trainBatches.Count];
                student.ZeroGrad();
                double loss = student.LogitMse(tokens, batchSize, Teacher(tokens), backward: true);
                foreach (var (module, m) in modules)
                {
                    var weight = student[module + ".weight"];
                    var grad = SignDots(weight.Grad.ToArray(), m, weight.Value.Dim(0), weight.Value.Dim(1));
                    for (int j = 0; j < m.Rounds; j++)
                    {
                        adamM[module][j] = beta1 * adamM[module][j] + (1 - beta1) * grad[j];
                        adamV[module][j] = beta2 * adamV[module][j] + (1 - beta2) * grad[j] * grad[j];
                        double mh = adamM[module][j] / (1 - Math.Pow(beta1, step)), vh = adamV[module][j] / (1 - Math.Pow(beta2, step));
                        scales[module][j] = (float)(scales[module][j] - learningRate * Math.Abs(start[module][j]) * mh / (Math.Sqrt(vh) + eps));
                    }

                    ops.Copy(baseModel[module + ".weight"].Value, weight.Value);
                    ops.BitDeltaDecode(pools[module], 0, weight.Value, accumulate: true, scales: scales[module]);
                }

                progress?.Invoke(step, loss);
            }
        }
        finally
        {
            foreach (var p in pools.Values) p.Dispose();
        }

        double after = Error();
        var tuned = new BitDelta(modules.ToDictionary(m => m.Key, m => new BitDeltaModule(m.Value.Signs, scales[m.Key])), delta.Dense, delta.BaseFingerprint);
        return new DistillReport(before, after, steps, tuned);
    }

    /// <summary>sum over (n, k) of g[n, k] * S_j[n, k] for every round j: the gradient of each scale.</summary>
    private static double[] SignDots(float[] g, BitDeltaModule m, int n, int k)
    {
        int words = (k + 31) / 32;
        var result = new double[m.Rounds];
        for (int j = 0; j < m.Rounds; j++)
        {
            var s = m.Signs[j];
            double acc = 0;
            for (int r = 0; r < n; r++)
            {
                for (int c = 0; c < k; c++)
                {
                    float v = g[r * k + c];
                    acc += ((s[r * words + (c >> 5)] >> (c & 31)) & 1) != 0 ? v : -v;
                }
            }

            result[j] = acc;
        }

        return result;
    }
}
