using PeftSharp.Formats;

namespace PeftSharp.Model;

/// <summary>
/// Merging a LoRA adapter into the base weights (W += s B A) and taking it back out (W -= s B A). A DoRA adapter
/// merges as W' = m / ||W + s B A||_row * (W + s B A); taking that out needs the row norms of the merge, which the
/// merged weight no longer holds, so <see cref="Merge"/> returns them.
/// </summary>
public static class LoraMerge
{
    /// <summary>Merges the adapter; the result holds what <see cref="Unmerge"/> needs for a DoRA adapter.</summary>
    public static MergeRecord Merge(LlamaModel model, PeftLoraAdapter adapter)
    {
        var norms = new Dictionary<string, float[]>();
        foreach (var (module, (a, b)) in adapter.Modules)
        {
            var w = model[module + ".weight"].Value; // (out, in)
            AddProduct(model, adapter, module, a, b, +1f);
            if (adapter.Magnitudes.TryGetValue(module, out var m))
            {
                var host = w.ToArray();
                int n = w.Dim(0), k = w.Dim(1);
                var norm = new float[n];
                var scale = new float[n];
                for (int r = 0; r < n; r++)
                {
                    double acc = 0;
                    for (int c = 0; c < k; c++) acc += (double)host[r * k + c] * host[r * k + c];
                    norm[r] = (float)Math.Max(Math.Sqrt(acc), 1e-12);
                    scale[r] = m[r] / norm[r];
                }

                ScaleRows(w, scale);
                norms[module] = norm;
            }
        }

        return new MergeRecord(norms);
    }

    /// <summary>
    /// Subtracts what <see cref="Merge"/> added; the weights return to the base up to fp32 rounding (see the tests).
    /// A DoRA adapter needs the <paramref name="record"/> its merge returned.
    /// </summary>
    public static void Unmerge(LlamaModel model, PeftLoraAdapter adapter, MergeRecord? record = null)
    {
        foreach (var (module, (a, b)) in adapter.Modules)
        {
            if (adapter.Magnitudes.TryGetValue(module, out var m))
            {
                if (record == null || !record.Norms.TryGetValue(module, out var norm))
                {
                    throw new ArgumentException($"unmerging the DoRA adapter on {module} needs the row norms its merge returned: ||W + s B A|| cannot be recovered from the merged weight");
                }

                ScaleRows(model[module + ".weight"].Value, norm.Select((v, i) => v / m[i]).ToArray());
            }

            AddProduct(model, adapter, module, a, b, -1f);
        }
    }

    private static void AddProduct(LlamaModel model, PeftLoraAdapter adapter, string module, float[] a, float[] b, float sign)
    {
        var device = model.Device;
        var w = model[module + ".weight"].Value;
        int r = adapter.Config.For(module).Rank;
        using var ta = device.FromArray(module + ".lora_A", a, r, w.Dim(1));
        using var tb = device.FromArray(module + ".lora_B", b, w.Dim(0), r);
        device.Ops.MatMul(tb, ta, w, alpha: sign * adapter.Config.Scale(module), beta: 1f);
    }

    /// <summary>W[r, :] *= scale[r] for W (out, in), through the host (a merge is a one-off).</summary>
    private static void ScaleRows(PeftSharp.Engine.Tensor w, float[] scale)
    {
        var host = w.ToArray();
        int k = w.Dim(1);
        for (int i = 0; i < host.Length; i++) host[i] *= scale[i / k];
        w.CopyFrom(host);
    }
}

/// <summary>What a merge must remember to be undone: DoRA's row norms of W + s B A, by module.</summary>
public sealed record MergeRecord(IReadOnlyDictionary<string, float[]> Norms);
