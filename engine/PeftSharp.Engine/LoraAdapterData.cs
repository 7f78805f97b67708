namespace PeftSharp.Engine;

/// <summary>One LoRA adapter for a linear layer (N, K): A (R, K), B (N, R), y += scale * (x A^T) B^T.</summary>
public sealed record LoraAdapterData(string Name, float[] A, float[] B, int Rank, float Scale);
