namespace PeftSharp.Merging;

/// <summary>
/// One source of a merge (a model under `models`, or a source of a slice) with its parameters. <see cref="Settings"/>
/// holds, per parameter name, the source's own entries followed by its slice's and the top level's, so the first entry
/// that applies to a tensor is mergekit's value (see <see cref="MergeSetting.Evaluate"/>).
/// </summary>
public sealed record MergeModelEntry(string Model, IReadOnlyDictionary<string, IReadOnlyList<MergeSetting>> Settings)
{
    /// <summary>The first layer this source gives (a slice's layer_range; null under `models`: 0).</summary>
    public int? From { get; init; }

    /// <summary>One past the last layer this source gives (null under `models`: the model's layer count).</summary>
    public int? To { get; init; }

    /// <summary>A per-model parameter for <paramref name="tensor"/> (the source's tensor name) at <paramref name="depth"/>, or null where none is given.</summary>
    public double? Value(string key, string tensor, double depth) => MergeSetting.Evaluate(Settings.GetValueOrDefault(key), tensor, depth);

    /// <summary>The task-vector parameters for <paramref name="tensor"/> at <paramref name="depth"/>, mergekit's defaults where none is given.</summary>
    public MergeInput At(string tensor, double depth)
    {
        float Get(string key, float fallback) => Value(key, tensor, depth) is double v ? (float)v : fallback;
        return new MergeInput(Get("weight", 1f), Get("density", 1f), Get("gamma", 0.01f)) { Epsilon = Get("epsilon", 0.15f) };
    }

    /// <summary>The parameters an unfiltered tensor gets at depth 0 (what the config says when no filter or gradient applies).</summary>
    public MergeInput Parameters => At("", 0);
}
