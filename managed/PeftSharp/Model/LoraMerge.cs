using PeftSharp.Formats;

namespace PeftSharp.Model;

/// <summary>Merging a LoRA adapter into the base weights (W += s B A) and taking it back out (W -= s B A).</summary>
public static class LoraMerge
{
    public static void Merge(LlamaModel model, PeftLoraAdapter adapter) => Apply(model, adapter, +1f);

    /// <summary>Subtracts what <see cref="Merge"/> added; the weights return to the base up to fp32 rounding (see the tests).</summary>
    public static void Unmerge(LlamaModel model, PeftLoraAdapter adapter) => Apply(model, adapter, -1f);

    private static void Apply(LlamaModel model, PeftLoraAdapter adapter, float sign)
    {
        var device = model.Device;
        foreach (var (module, (a, b)) in adapter.Modules)
        {
            var w = model[module + ".weight"].Value; // (out, in)
            int r = adapter.Config.For(module).Rank;
            using var ta = device.FromArray(module + ".lora_A", a, r, w.Dim(1));
            using var tb = device.FromArray(module + ".lora_B", b, w.Dim(0), r);
            device.Ops.MatMul(tb, ta, w, alpha: sign * adapter.Config.Scale(module), beta: 1f);
        }
    }
}
