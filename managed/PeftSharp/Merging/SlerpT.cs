namespace PeftSharp.Merging;

/// <summary>
/// One entry of slerp's t: applies to tensors whose name contains <paramref name="Filter"/> (null: every tensor);
/// <paramref name="Values"/> is one number, or a gradient over the layers.
/// </summary>
public sealed record SlerpT(string? Filter, float[] Values)
{
    /// <summary>t for a tensor at relative depth <paramref name="depth"/> in [0, 1] (see <see cref="Gradient"/>).</summary>
    public double At(double depth) => Gradient(Values, depth);

    /// <summary>
    /// A mergekit gradient at relative depth <paramref name="depth"/> in [0, 1], as its evaluate_setting reads one:
    /// position depth (n - 1) in the list, linearly between its two neighbours (one value: that value).
    /// </summary>
    public static double Gradient(IReadOnlyList<float> values, double depth)
    {
        if (values.Count == 1) return values[0];
        double scaled = depth * (values.Count - 1);
        int i0 = (int)Math.Floor(scaled), i1 = Math.Min(values.Count - 1, i0 + 1);
        double frac = scaled - i0;
        return (1 - frac) * values[i0] + frac * values[i1];
    }
}
