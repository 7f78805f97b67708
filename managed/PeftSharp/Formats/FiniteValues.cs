namespace PeftSharp.Formats;

/// <summary>The one scan for NaN and infinite values that loading (a warning) and writing (a refusal) share.</summary>
internal static class FiniteValues
{
    /// <summary>How many values are NaN or larger in magnitude than <paramref name="limit"/>, and the index of the first (-1: none).</summary>
    public static (int Count, int First) Beyond(ReadOnlySpan<float> values, float limit = float.MaxValue)
    {
        int count = 0, first = -1;
        for (int i = 0; i < values.Length; i++)
        {
            if (!(MathF.Abs(values[i]) <= limit) && count++ == 0) first = i;
        }

        return (count, first);
    }
}
