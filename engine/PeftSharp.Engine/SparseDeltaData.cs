namespace PeftSharp.Engine;

/// <summary>One variant's sparse delta for a linear layer (N, K): flat indices (row-major, distinct) and values.</summary>
public sealed record SparseDeltaData(string Name, int[] Index, float[] Values);
