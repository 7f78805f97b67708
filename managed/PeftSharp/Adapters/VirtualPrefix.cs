using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// Prefix tuning's trainable virtual tokens: per layer, keys and values (P, Hkv, D) that every sequence reads as a
/// shared prefix (used as they are: transformers treats them as an already-rotated cache). With a
/// <see cref="Projection"/> (P-tuning v2's reparameterisation) the keys and values are computed from it before each
/// pass and its parameters train instead.
/// </summary>
public sealed class VirtualPrefix : IDisposable
{
    public VirtualPrefix(IReadOnlyList<Parameter> keys, IReadOnlyList<Parameter> values, PrefixProjection? projection = null)
    {
        Keys = keys;
        Values = values;
        Projection = projection;
        Tokens = keys.Count == 0 ? 0 : keys[0].Value.Dim(0);
    }

    public IReadOnlyList<Parameter> Keys { get; }
    public IReadOnlyList<Parameter> Values { get; }

    /// <summary>The reparameterising MLP, or null when the keys and values train directly.</summary>
    public PrefixProjection? Projection { get; }

    /// <summary>Virtual tokens (P).</summary>
    public int Tokens { get; }

    /// <summary>
    /// Prefix tuning's virtual tokens for every layer of <paramref name="c"/>: keys and values (P, Hkv, D) drawn from
    /// normal(0, 1) as PEFT's prefix embedding initialises them, or taken from <paramref name="keys"/> and
    /// <paramref name="values"/> (one array per layer); with <paramref name="projectionHidden"/> > 0, computed by
    /// P-tuning v2's MLP of that width from PyTorch's default initialisation.
    /// </summary>
    public static VirtualPrefix Create(Device device, LlamaConfig c, int tokens, int seed, IReadOnlyList<float[]>? keys = null, IReadOnlyList<float[]>? values = null, int projectionHidden = 0)
    {
        if (tokens <= 0) throw new ArgumentException($"num_virtual_tokens {tokens} must be positive");
        if (projectionHidden < 0 || (projectionHidden > 0 && keys != null)) throw new ArgumentException("a prefix projection starts from its own initialisation, not from given keys and values");
        int tokenDim = c.NumKeyValueHeads * c.HeadDim, size = tokens * tokenDim;
        var rng = new Random(seed);
        float[] Init(IReadOnlyList<float[]>? given, int layer, string what)
        {
            if (given == null) return projectionHidden > 0 ? new float[size] : Enumerable.Range(0, size).Select(_ => (float)LlamaModel.Gaussian(rng)).ToArray();
            if (given.Count != c.NumHiddenLayers || given[layer].Length != size)
            {
                throw new ArgumentException($"prefix {what}: expected {c.NumHiddenLayers} layers of {tokens} x {c.NumKeyValueHeads} x {c.HeadDim} values");
            }

            return given[layer];
        }

        var k = new List<Parameter>();
        var v = new List<Parameter>();
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            k.Add(new Parameter($"prefix.{l}.key", device.FromArray($"prefix.{l}.key", Init(keys, l, "keys"), tokens, c.NumKeyValueHeads, c.HeadDim)));
            v.Add(new Parameter($"prefix.{l}.value", device.FromArray($"prefix.{l}.value", Init(values, l, "values"), tokens, c.NumKeyValueHeads, c.HeadDim)));
        }

        PrefixProjection? projection = null;
        if (projectionHidden > 0)
        {
            // PyTorch's defaults: the embedding from normal(0, 1), each Linear's weight and bias uniform in +-1/sqrt(fan_in).
            Parameter Uniform(string name, int fanIn, params int[] shape)
            {
                float bound = 1f / MathF.Sqrt(fanIn);
                int n = shape.Aggregate(1, (a, b) => a * b);
                return new Parameter(name, device.FromArray(name, Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() * 2 - 1) * bound)).ToArray(), shape));
            }

            int outDim = c.NumHiddenLayers * 2 * tokenDim;
            projection = new PrefixProjection(
                new Parameter("prefix.embedding", device.FromArray("prefix.embedding", Enumerable.Range(0, size).Select(_ => (float)LlamaModel.Gaussian(rng)).ToArray(), tokens, tokenDim)),
                Uniform("prefix.transform.0.weight", tokenDim, projectionHidden, tokenDim), Uniform("prefix.transform.0.bias", tokenDim, projectionHidden),
                Uniform("prefix.transform.2.weight", projectionHidden, outDim, projectionHidden), Uniform("prefix.transform.2.bias", projectionHidden, outDim));
        }

        var prefix = new VirtualPrefix(k, v, projection);
        prefix.Materialize();
        return prefix;
    }

    /// <summary>What an optimizer steps: the projection's parameters, or the keys and values themselves.</summary>
    public IEnumerable<Parameter> Parameters => Projection?.Parameters ?? Keys.Concat(Values);

    /// <summary>Recomputes the keys and values from the projection (no-op without one); clears their gradients.</summary>
    public void Materialize() => Projection?.Forward(this);

    internal PrefixLevel Level(int layer, int batch)
    {
        var k = Keys[layer].Value;
        return new PrefixLevel(k.Reshape(1, k.Dim(0), k.Dim(1), k.Dim(2)), Values[layer].Value.Reshape(1, k.Dim(0), k.Dim(1), k.Dim(2)), new int[batch]);
    }

    public void Dispose()
    {
        foreach (var p in Keys.Concat(Values)) p.Dispose();
        Projection?.Dispose();
    }
}
