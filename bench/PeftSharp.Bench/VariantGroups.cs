using PeftSharp.Engine;

namespace PeftSharp.Bench;

/// <summary>
/// The rows of a mixed batch grouped by variant and gathered ahead of time, so a per-variant baseline is not charged
/// for the gathering; <see cref="Scatter"/> puts the groups' outputs back in batch order for validation.
/// </summary>
internal sealed class VariantGroups : IDisposable
{
    public VariantGroups(Device device, float[] xs, int[] assignment, int variants, int width)
    {
        Width = width;
        Groups = Enumerable.Range(0, variants).Select(v =>
        {
            var rows = Enumerable.Range(0, assignment.Length).Where(i => assignment[i] == v).ToArray();
            var gx = device.FromArray("x_group", rows.SelectMany(i => xs.AsSpan(i * width, width).ToArray()).ToArray(), rows.Length, width);
            return (v, rows, gx, device.Zeros("y_group", rows.Length, width));
        }).ToList();
    }

    public int Width { get; }

    /// <summary>Per variant: its row indices in the batch, its gathered inputs (rows, width) and an output (rows, width).</summary>
    public IReadOnlyList<(int Variant, int[] Rows, Tensor X, Tensor Y)> Groups { get; }

    /// <summary>The groups' outputs in batch order (rows x width).</summary>
    public float[] Scatter(int batchRows)
    {
        var result = new float[batchRows * Width];
        foreach (var (_, rows, _, y) in Groups)
        {
            var gy = y.ToArray();
            for (int j = 0; j < rows.Length; j++) gy.AsSpan(j * Width, Width).CopyTo(result.AsSpan(rows[j] * Width, Width));
        }

        return result;
    }

    public void Dispose()
    {
        foreach (var g in Groups)
        {
            g.X.Dispose();
            g.Y.Dispose();
        }
    }
}
