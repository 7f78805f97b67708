namespace PeftSharp.Merging;

/// <summary>One input of a merge: a model (or adapter, or delta) folder and its options.</summary>
public sealed record MergeModelEntry(string Model, MergeInput Parameters);
