namespace PeftSharp.Merging;

/// <summary>
/// One output slice of a merge: its sources give the same number of layers, merged layer by layer into consecutive
/// output layers. A `models` config is one slice whose sources are the whole models. <see cref="Settings"/> holds the
/// whole-merge parameters (t, lambda, scale, ...) as this slice sees them: its own entries, then the top level's.
/// </summary>
public sealed record MergeSlice(IReadOnlyList<MergeModelEntry> Sources, IReadOnlyDictionary<string, IReadOnlyList<MergeSetting>> Settings)
{
    /// <summary>A whole-merge parameter for the output tensor <paramref name="tensor"/> at <paramref name="depth"/>, or null where none is given.</summary>
    public double? Value(string key, string tensor, double depth) => MergeSetting.Evaluate(Settings.GetValueOrDefault(key), tensor, depth);
}
