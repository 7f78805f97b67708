using System.Text.RegularExpressions;
using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>Selecting parameters by name, freezing, layer-wise learning-rate decay, per-parameter clipping.</summary>
public static class ParameterTools
{
    /// <summary>Glob over Hugging Face names: '*' matches any run of characters (dots included), '?' one character.</summary>
    public static bool Matches(string name, string pattern) =>
        Regex.IsMatch(name, "^" + Regex.Escape(pattern).Replace("\\*", ".*").Replace("\\?", ".") + "$");

    /// <summary>
    /// Freezes every parameter matching any pattern. A pattern that matches nothing is an error listing it (a
    /// silent no-op would train what the user meant to freeze). Returns the number frozen.
    /// </summary>
    public static int Freeze(LlamaModel model, IReadOnlyList<string> patterns)
    {
        var unmatched = patterns.Where(pt => !model.Parameters.Any(p => Matches(p.Name, pt))).ToList();
        if (unmatched.Count > 0)
        {
            throw new ArgumentException($"freeze patterns match no parameter: {string.Join(", ", unmatched)} (names look like model.layers.0.mlp.up_proj.weight)");
        }

        int n = 0;
        foreach (var p in model.Parameters.Where(p => patterns.Any(pt => Matches(p.Name, pt))))
        {
            p.Trainable = false;
            n++;
        }

        return n;
    }

    private static readonly Regex LayerIndex = new(@"^model\.layers\.(\d+)\.", RegexOptions.Compiled);

    /// <summary>
    /// Layer-wise learning-rate decay: layer i of L gets decay^(L - i), the embedding decay^(L + 1), the final norm and
    /// LM head 1 (the top of the network learns fastest).
    /// </summary>
    public static Func<string, float> LayerDecay(LlamaConfig config, float decay)
    {
        if (decay is <= 0 or > 1) throw new ArgumentException($"layer decay {decay} must be in (0, 1]");
        int layers = config.NumHiddenLayers;
        return name =>
        {
            var m = LayerIndex.Match(name);
            if (m.Success) return MathF.Pow(decay, layers - int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
            return name.StartsWith("model.embed_tokens", StringComparison.Ordinal) && !config.TieWordEmbeddings ? MathF.Pow(decay, layers + 1) : 1f;
        };
    }

    /// <summary>Clips each gradient to <paramref name="maxNorm"/> on its own; returns the largest norm seen.</summary>
    public static double ClipPerParameter(Ops ops, IEnumerable<Parameter> parameters, double maxNorm)
    {
        double largest = 0;
        foreach (var p in parameters.Where(p => p.Trainable))
        {
            largest = Math.Max(largest, ops.ClipGlobalNorm(new[] { p.Grad }, maxNorm));
        }

        return largest;
    }
}
