using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>One batch's rows bound to their variants; per-row index tensors are built once per distinct slot map.</summary>
public sealed class RowVariantBatch : IRowVariants, IDisposable
{
    private readonly VariantSet set;
    private readonly int[] rowVariants;
    private readonly Dictionary<string, IndexTensor?> rowSlots = new();

    internal RowVariantBatch(VariantSet set, int[] rowVariants)
    {
        this.set = set;
        this.rowVariants = rowVariants;
    }

    public int Rows => rowVariants.Length;

    public Tensor? Replacement(string parameter, int row) => set.HasReplacements ? set.ReplacementOf(rowVariants[row], parameter) : null;

    public void Apply(string module, Tensor x, Tensor y)
    {
        if (!set.TryGetPools(module, out var p)) return;
        var ops = set.Model.Device.Ops;
        if (p.Lora != null && RowSlots(p.LoraSlots) is { } loraRows) ops.LoraMixed(x, y, p.Lora, loraRows);
        if (p.DoraScales != null && RowSlots(p.DoraSlots) is { } doraRows) ops.DoraScale(y, p.DoraScales, doraRows); // after the row's LoRA delta
        if (p.Delta != null && RowSlots(p.DeltaSlots) is { } deltaRows) ops.BitDeltaMixed(x, y, p.Delta, deltaRows);
        if (p.Sparse != null && RowSlots(p.SparseSlots) is { } sparseRows) ops.SparseDeltaMixed(x, y, p.Sparse, sparseRows);
        if (p.OutputScales != null && RowSlots(p.OutputScaleSlots) is { } scaledRows) ops.DoraScale(y, p.OutputScales, scaledRows); // IA3, SSF: y[i, :] *= the row's scale
    }

    public Tensor? ScaleInput(string module, Tensor x)
    {
        if (!set.TryGetPools(module, out var p) || p.InputScales == null || RowSlots(p.InputScaleSlots) is not { } rows) return null;
        var scaled = set.Model.Device.Zeros("ia3_scaled_input", x.Shape.ToArray());
        var ops = set.Model.Device.Ops;
        ops.Copy(x, scaled);
        ops.DoraScale(scaled, p.InputScales, rows); // x[i, :] *= l for IA3 feedforward rows
        return scaled;
    }

    /// <summary>Each row's slot in a pool with this variant-to-slot map; null when no row uses the pool. Modules with the same map share one tensor.</summary>
    private IndexTensor? RowSlots(VariantSet.SlotMap map)
    {
        if (!rowSlots.TryGetValue(map.Key, out var idx))
        {
            var slots = rowVariants.Select(v => v < 0 ? -1 : map.Slots[v]).ToArray();
            idx = slots.Any(s => s >= 0) ? set.Model.Device.FromIndices("row_slots", slots) : null;
            rowSlots[map.Key] = idx;
        }

        return idx;
    }

    public void Dispose()
    {
        foreach (var t in rowSlots.Values) t?.Dispose();
        rowSlots.Clear();
    }
}
