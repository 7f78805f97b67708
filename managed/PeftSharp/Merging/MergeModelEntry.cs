namespace PeftSharp.Merging;

/// <summary>One input of a merge and its parameters; a parameter given as a list is a gradient over the layers.</summary>
public sealed record MergeModelEntry(string Model, MergeInput Parameters)
{
    /// <summary>weight, density or gamma given as lists (mergekit's gradients), by name; absent ones are the scalars in <see cref="Parameters"/>.</summary>
    public IReadOnlyDictionary<string, float[]> Gradients { get; init; } = new Dictionary<string, float[]>();

    /// <summary>The parameters for a tensor at relative depth <paramref name="depth"/> (see <see cref="SlerpT.Gradient"/>).</summary>
    public MergeInput At(double depth)
    {
        float Value(string key, float scalar) => Gradients.TryGetValue(key, out var g) ? (float)SlerpT.Gradient(g, depth) : scalar;
        return Gradients.Count == 0 ? Parameters
            : Parameters with { Weight = Value("weight", Parameters.Weight), Density = Value("density", Parameters.Density), Gamma = Value("gamma", Parameters.Gamma) };
    }
}
