namespace PeftSharp.Model;

/// <summary>What a merge must remember to be undone: DoRA's row norms of W + s B A, by module.</summary>
public sealed record MergeRecord(IReadOnlyDictionary<string, float[]> Norms);
