namespace PeftSharp.Formats;

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Begin">First byte, relative to the start of the data section.</param>
public sealed record SafeTensorEntry(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long Elements => Shape.Aggregate(1L, (a, d) => a * d);

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";
}
