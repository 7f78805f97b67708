using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// The base model's parameters under Hugging Face's names, in checkpoint order, with the ones the model reads by
/// role (embedding, final norm, LM head) typed. Layers are built over these by <see cref="DecoderLayer"/>.
/// </summary>
internal sealed class LlamaWeights : IDisposable
{
    private readonly Dictionary<string, Parameter> byName = new();
    private readonly List<Parameter> all = new();

    private LlamaWeights(LlamaConfig config)
    {
        Config = config;
    }

    public LlamaConfig Config { get; }

    public IReadOnlyList<Parameter> All => all;

    public Parameter Embedding => this["model.embed_tokens.weight"];

    public Parameter FinalNorm => this["model.norm.weight"];

    /// <summary>The LM head: the embedding when tied.</summary>
    public Parameter LmHead => Config.TieWordEmbeddings ? Embedding : this["lm_head.weight"];

    public Parameter this[string name] => byName.TryGetValue(name, out var p)
        ? p
        : throw new KeyNotFoundException($"model has no parameter '{name}'");

    public bool Has(string name) => byName.ContainsKey(name);

    /// <summary>The Hugging Face names and shapes of every parameter this config has, in checkpoint order.</summary>
    public static IEnumerable<(string Name, int[] Shape)> Shapes(LlamaConfig c)
    {
        int d = c.HeadDim;
        yield return ("model.embed_tokens.weight", new[] { c.VocabSize, c.HiddenSize });
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.";
            yield return (p + "input_layernorm.weight", new[] { c.HiddenSize });
            foreach (var (proj, rows) in new[] { ("q_proj", c.NumAttentionHeads * d), ("k_proj", c.NumKeyValueHeads * d), ("v_proj", c.NumKeyValueHeads * d) })
            {
                yield return (p + $"self_attn.{proj}.weight", new[] { rows, c.HiddenSize });
                if (c.QkvBias) yield return (p + $"self_attn.{proj}.bias", new[] { rows }); // Qwen2
            }

            yield return (p + "self_attn.o_proj.weight", new[] { c.HiddenSize, c.NumAttentionHeads * d });
            if (c.QkNorm)
            {
                yield return (p + "self_attn.q_norm.weight", new[] { d });
                yield return (p + "self_attn.k_norm.weight", new[] { d });
            }

            yield return (p + "post_attention_layernorm.weight", new[] { c.HiddenSize });
            yield return (p + "mlp.gate_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return (p + "mlp.up_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return (p + "mlp.down_proj.weight", new[] { c.HiddenSize, c.IntermediateSize });
        }

        yield return ("model.norm.weight", new[] { c.HiddenSize });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new[] { c.VocabSize, c.HiddenSize });
    }

    /// <summary>Every parameter of <paramref name="config"/> on <paramref name="device"/>, its values from (name, shape) -> data.</summary>
    public static LlamaWeights FromTensors(Device device, LlamaConfig config, Func<string, int[], float[]> values) =>
        Build(config, (name, shape) => device.FromArray(name, values(name, shape), shape));

    /// <summary>
    /// As above with each parameter's values written by <paramref name="fill"/> into one scratch buffer (the largest
    /// tensor's size, reused) and copied to the device from there: a loader then makes no array per tensor. With an array
    /// per tensor, loading TinyLlama-1.1B's BF16 file peaked at 9.0 GB of RSS for 4.4 GB of fp32 weights (the spent
    /// arrays waiting for a collection of the large object heap).
    /// </summary>
    public static LlamaWeights FromTensors(Device device, LlamaConfig config, TensorFill fill)
    {
        int largest = Shapes(config).Max(s => s.Shape.Aggregate(1, (a, b) => checked(a * b)));
        var scratch = System.Buffers.ArrayPool<float>.Shared.Rent(largest);
        try
        {
            return Build(config, (name, shape) =>
            {
                var data = scratch.AsSpan(0, shape.Aggregate(1, (a, b) => a * b));
                fill(name, shape, data);
                return device.FromArray(name, data, shape);
            });
        }
        finally
        {
            System.Buffers.ArrayPool<float>.Shared.Return(scratch);
        }
    }

    /// <summary>Every parameter of <paramref name="config"/>, each tensor from <paramref name="make"/>; what was made is freed if one fails.</summary>
    private static LlamaWeights Build(LlamaConfig config, Func<string, int[], Tensor> make)
    {
        var weights = new LlamaWeights(config);
        try
        {
            foreach (var (name, shape) in Shapes(config))
            {
                var p = new Parameter(name, make(name, shape));
                weights.all.Add(p);
                weights.byName.Add(name, p);
            }
        }
        catch
        {
            weights.Dispose();
            throw;
        }

        return weights;
    }

    public void Dispose()
    {
        foreach (var p in all) p.Dispose();
        all.Clear();
        byName.Clear();
    }
}

/// <summary>Writes parameter <paramref name="name"/>'s values (of <paramref name="shape"/>) into <paramref name="destination"/>.</summary>
public delegate void TensorFill(string name, int[] shape, Span<float> destination);
