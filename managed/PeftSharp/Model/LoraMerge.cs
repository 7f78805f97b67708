using PeftSharp.Formats;

namespace PeftSharp.Model;

/// <summary>
/// Merging a LoRA adapter into the base weights (W += s B A) and taking it back out (W -= s B A). A DoRA adapter
/// merges as W' = m / ||W + s B A||_row * (W + s B A); taking that out needs the row norms of the merge, which the
/// merged weight no longer holds, so <see cref="Merge"/> returns them. lora_B's bias (lora_bias) merges into the
/// module's bias, b' = b + s b_B; a module without a bias refuses the merge, as PEFT does.
/// </summary>
public static class LoraMerge
{
    /// <summary>Merges the adapter; the result holds what <see cref="Unmerge"/> needs for a DoRA adapter.</summary>
    public static MergeRecord Merge(LlamaModel model, PeftLoraAdapter adapter)
    {
        RefuseActivated(adapter, "merged into the weights");
        var bare = adapter.Biases.Keys.Where(m => !model.Has(m + ".bias")).ToList();
        if (bare.Count > 0)
        {
            throw new NotSupportedException($"lora_bias: {string.Join(", ", bare)} {(bare.Count == 1 ? "has" : "have")} no bias to merge lora_B's bias into (PEFT refuses this merge " +
                "too); serve the adapter unmerged (eval or generate --adapter), where each row adds its own bias");
        }

        AddBiases(model, adapter, +1f);
        var norms = new Dictionary<string, float[]>();
        foreach (var (module, (a, b)) in adapter.Modules)
        {
            var w = model[module + ".weight"].Value; // (out, in)
            AddProduct(model, adapter, module, a, b, +1f);
            if (adapter.Magnitudes.TryGetValue(module, out var m))
            {
                var norm = RowNorms(w.ToArray(), w.Dim(0), w.Dim(1)).Select(v => (float)Math.Max(v, 1e-12)).ToArray();
                var scale = norm.Select((v, r) => m[r] / v).ToArray();

                ScaleRows(w, scale);
                norms[module] = norm;
            }
        }

        // modules_to_save: the adapter's whole copies replace the base's (kept, so Unmerge can put them back).
        var replaced = new Dictionary<string, float[]>();
        foreach (var (parameter, values) in adapter.Saved)
        {
            replaced[parameter] = model[parameter].Value.ToArray();
            model[parameter].Value.CopyFrom(values);
        }

        return new MergeRecord(norms) { Replaced = replaced };
    }

    /// <summary>
    /// Subtracts what <see cref="Merge"/> added; the weights return to the base up to fp32 rounding (see the tests).
    /// A DoRA adapter needs the <paramref name="record"/> its merge returned.
    /// </summary>
    public static void Unmerge(LlamaModel model, PeftLoraAdapter adapter, MergeRecord? record = null)
    {
        foreach (var parameter in adapter.Saved.Keys)
        {
            if (record == null || !record.Replaced.TryGetValue(parameter, out var original))
            {
                throw new ArgumentException($"unmerging the adapter's copy of {parameter} (modules_to_save) needs the base values its merge returned");
            }

            model[parameter].Value.CopyFrom(original);
        }

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

        AddBiases(model, adapter, -1f);
    }

    /// <summary>
    /// An activated LoRA adapts only the positions from its invocation tokens on; merged or applied to every position it
    /// would be another model (PEFT refuses its merge too).
    /// </summary>
    internal static void RefuseActivated(PeftLoraAdapter adapter, string what)
    {
        if (adapter.Config.AloraInvocationTokens is { } inv)
        {
            throw new NotSupportedException($"an activated LoRA (alora_invocation_tokens [{string.Join(", ", inv)}]) cannot be {what}: it adapts only the positions from its " +
                "invocation tokens on; serve it unmerged (peft serve, generate --requests, VariantServer, BatchGenerator)");
        }
    }

    /// <summary>Each module's bias += sign s b_B (lora_bias).</summary>
    private static void AddBiases(LlamaModel model, PeftLoraAdapter adapter, float sign)
    {
        foreach (var (module, bias) in adapter.Biases)
        {
            var target = model[module + ".bias"].Value;
            float s = sign * adapter.Config.Scale(module);
            target.CopyFrom(target.ToArray().Select((v, i) => v + s * bias[i]).ToArray());
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

    /// <summary>The L2 norm of each row of <paramref name="w"/> (rows, cols), summed in double in row order.</summary>
    public static double[] RowNorms(float[] w, int rows, int cols)
    {
        var norms = new double[rows];
        for (int r = 0; r < rows; r++)
        {
            double acc = 0;
            for (int c = 0; c < cols; c++) acc += (double)w[r * cols + c] * w[r * cols + c];
            norms[r] = Math.Sqrt(acc);
        }

        return norms;
    }

    /// <summary>||W + s B A|| of every output row (DoRA's norm), forming W + s B A once on the device.</summary>
    public static double[] MergedRowNorms(PeftSharp.Engine.Tensor w, PeftSharp.Engine.Tensor a, PeftSharp.Engine.Tensor b, float scale)
    {
        var d = w.Device;
        using var merged = d.Zeros("dora_w", w.Shape.ToArray());
        d.Ops.Copy(w, merged);
        d.Ops.MatMul(b, a, merged, alpha: scale, beta: 1f);
        return RowNorms(merged.ToArray(), w.Dim(0), w.Dim(1));
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
