namespace PeftSharp.Model;

/// <summary>What a merge must remember to be undone: DoRA's row norms of W + s B A, by module.</summary>
public sealed record MergeRecord(IReadOnlyDictionary<string, float[]> Norms)
{
    /// <summary>The base's values of the parameters the adapter's modules_to_save replaced, by name.</summary>
    public IReadOnlyDictionary<string, float[]> Replaced { get; init; } = new Dictionary<string, float[]>();
}
