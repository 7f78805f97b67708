namespace PeftSharp.Serving;

/// <summary>How a batch shared prefixes: distinct prefixes computed once, the sequences reading them, and the prefix tokens not recomputed.</summary>
public sealed record SharingReport(int Prefixes, int SharingSequences, long TokensSaved);
