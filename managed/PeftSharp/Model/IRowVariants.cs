using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// What each row of a batch adds on top of the shared base weights: a LoRA adapter, a 1-bit delta, a sparse delta,
/// several of these, or nothing. The model computes y = x W^T once for the whole batch, then calls
/// <see cref="Apply"/> so every row gets its own variant's delta for that module.
/// </summary>
public interface IRowVariants
{
    /// <summary>Rows of the batch this binding covers (N).</summary>
    int Rows { get; }

    /// <summary>y (N, out) += each row's variant delta applied to x (N, in) for the linear <paramref name="module"/>.</summary>
    void Apply(string module, Tensor x, Tensor y);

    /// <summary>
    /// x (N, in) with each row scaled as its variant scales the input of <paramref name="module"/> (an IA3 feedforward
    /// vector), before the shared product; null when no row does. The caller disposes the copy.
    /// </summary>
    Tensor? ScaleInput(string module, Tensor x) => null;

    /// <summary>
    /// A whole parameter that row <paramref name="row"/>'s variant uses instead of the base's: a norm weight, the
    /// embedding table or the LM head (a full fine-tune changes them too; its delta keeps them densely). Null: the
    /// base's. The model applies these to the rows they cover, runs of rows with the same tensor at once.
    /// </summary>
    Tensor? Replacement(string parameter, int row) => null;
}

/// <summary>Where a batch's row variants replace a whole parameter.</summary>
internal static class VariantRuns
{
    /// <summary>
    /// Runs of consecutive entries of <paramref name="rows"/> whose rows' variants replace <paramref name="parameter"/>
    /// with the same tensor: (index of the run's first entry, entries, the tensor).
    /// </summary>
    public static IReadOnlyList<(int Start, int Count, Tensor Value)> Replacements(IRowVariants? variants, string parameter, IEnumerable<int> rows)
    {
        if (variants == null) return Array.Empty<(int, int, Tensor)>(); // every norm of every layer asks, serving or not
        var runs = new List<(int, int, Tensor)>();
        int at = 0;
        Tensor? current = null;
        int start = 0;
        foreach (int row in rows)
        {
            var t = variants.Replacement(parameter, row);
            if (!ReferenceEquals(t, current))
            {
                if (current != null) runs.Add((start, at - start, current));
                current = t;
                start = at;
            }

            at++;
        }

        if (current != null) runs.Add((start, at - start, current));
        return runs;
    }
}
