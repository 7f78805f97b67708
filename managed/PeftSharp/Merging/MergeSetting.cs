namespace PeftSharp.Merging;

/// <summary>
/// One entry of a mergekit parameter: applies to tensors whose name contains <paramref name="Filter"/> (null: every
/// tensor); <paramref name="Values"/> is one number, or a gradient over the layers. A parameter is a list of entries:
/// a plain number is one entry without a filter, `[{filter: self_attn, value: [0, 1]}, {value: 0.5}]` two.
/// </summary>
public sealed record MergeSetting(string? Filter, float[] Values)
{
    /// <summary>The value for a tensor at relative depth <paramref name="depth"/> in [0, 1] (see <see cref="Gradient"/>).</summary>
    public double At(double depth) => Gradient(Values, depth);

    /// <summary>Whether this entry applies to <paramref name="tensor"/> (mergekit: the filter is a substring of the name).</summary>
    public bool AppliesTo(string tensor) => Filter == null || tensor.Contains(Filter, StringComparison.Ordinal);

    /// <summary>
    /// A parameter's value for <paramref name="tensor"/>, as mergekit's ConfigReader finds it: the levels are searched in
    /// order (a source's own entries, then its slice's, then the top level's, concatenated in <paramref name="entries"/>)
    /// and the first entry that applies is evaluated at <paramref name="depth"/>; null when none applies.
    /// </summary>
    public static double? Evaluate(IReadOnlyList<MergeSetting>? entries, string tensor, double depth) =>
        entries?.FirstOrDefault(e => e.AppliesTo(tensor))?.At(depth);

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
