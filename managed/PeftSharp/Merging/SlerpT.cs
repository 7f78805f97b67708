namespace PeftSharp.Merging;

/// <summary>
/// One entry of slerp's t: applies to tensors whose name contains <paramref name="Filter"/> (null: every tensor);
/// <paramref name="Values"/> is one number, or a gradient over the layers.
/// </summary>
public sealed record SlerpT(string? Filter, float[] Values)
{
    /// <summary>
    /// t for a tensor at relative depth <paramref name="depth"/> in [0, 1], as mergekit's evaluate_setting reads a
    /// gradient: position depth (n - 1) in the list, linearly between its two neighbours.
    /// </summary>
    public double At(double depth)
    {
        if (Values.Length == 1) return Values[0];
        double scaled = depth * (Values.Length - 1);
        int i0 = (int)Math.Floor(scaled), i1 = Math.Min(Values.Length - 1, i0 + 1);
        double frac = scaled - i0;
        return (1 - frac) * Values[i0] + frac * Values[i1];
    }
}
