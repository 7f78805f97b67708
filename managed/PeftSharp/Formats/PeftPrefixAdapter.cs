using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Model;

using PeftSharp.Variants;

namespace PeftSharp.Formats;

/// <summary>
/// A PEFT prefix-tuning folder (peft_type PREFIX_TUNING): adapter_config.json and adapter_model.safetensors holding
/// `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * token_dim]. PEFT views it as (P, L * 2, Hkv, D) and
/// hands entry 2l to layer l as its keys and 2l + 1 as its values (token_dim = Hkv * D, num_attention_heads = Hkv for
/// grouped-query models). Saved without the reparameterising MLP (prefix_projection false): a prefix trained through
/// one is exported as the keys and values it computes, which is all inference needs.
/// </summary>
public sealed class PeftPrefixAdapter : IVariant
{
    public const string Key = "prompt_embeddings";

    public PeftPrefixAdapter(int virtualTokens, IReadOnlyList<float[]> keys, IReadOnlyList<float[]> values, string? baseModel = null)
    {
        VirtualTokens = virtualTokens;
        Keys = keys;
        Values = values;
        BaseModelNameOrPath = baseModel;
    }

    public int VirtualTokens { get; }

    public string Kind => "prefix tuning";

    public string Summary => $"prefix tuning with {VirtualTokens} virtual tokens per layer";

    /// <summary>Prefix tuning adds keys and values to attention, which no weight change reproduces: refused.</summary>
    public void MergeInto(LlamaModel model) =>
        throw new NotSupportedException($"a prefix-tuning adapter ({VirtualTokens} virtual tokens) cannot be merged into the weights: serve it as a variant (peft generate --adapters) or " +
            $"load it with --prefix");

    /// <summary>Per layer, (P, Hkv, D) row-major.</summary>
    public IReadOnlyList<float[]> Keys { get; }

    public IReadOnlyList<float[]> Values { get; }

    public string? BaseModelNameOrPath { get; }

    public static PeftPrefixAdapter From(LlamaModel model, string? baseModel = null)
    {
        var p = model.Prefix ?? throw new InvalidOperationException("the model has no prefix tuning to export");
        p.Materialize(); // a reparameterised prefix exports the keys and values its MLP computes now
        return new PeftPrefixAdapter(p.Tokens, p.Keys.Select(k => k.Value.ToArray()).ToArray(), p.Values.Select(v => v.Value.ToArray()).ToArray(), baseModel);
    }

    public void Save(string folder, LlamaConfig model)
    {
        int l = model.NumHiddenLayers, tokenDim = model.NumKeyValueHeads * model.HeadDim, p = VirtualTokens;
        var emb = new float[p * l * 2 * tokenDim];
        for (int t = 0; t < p; t++)
        {
            for (int layer = 0; layer < l; layer++)
            {
                Keys[layer].AsSpan(t * tokenDim, tokenDim).CopyTo(emb.AsSpan(((t * l + layer) * 2) * tokenDim, tokenDim));
                Values[layer].AsSpan(t * tokenDim, tokenDim).CopyTo(emb.AsSpan(((t * l + layer) * 2 + 1) * tokenDim, tokenDim));
            }
        }

        Directory.CreateDirectory(folder);
        SafeTensorsWriter.Write(Path.Combine(folder, PeftLoraAdapter.WeightsFile), new[] { new SafeTensorData(Key, emb, new[] { p, l * 2 * tokenDim }) },
            new Dictionary<string, string> { ["format"] = "pt" });
        var o = new JsonObject
        {
            ["peft_type"] = "PREFIX_TUNING",
            ["task_type"] = "CAUSAL_LM",
            ["num_virtual_tokens"] = p,
            ["token_dim"] = tokenDim,
            ["num_transformer_submodules"] = 1,
            ["num_attention_heads"] = model.NumKeyValueHeads,
            ["num_layers"] = l,
            ["encoder_hidden_size"] = model.HiddenSize,
            ["prefix_projection"] = false,
            ["inference_mode"] = true,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
        };
        AtomicFile.WriteText(Path.Combine(folder, PeftLoraAdapter.ConfigFile), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Reads a PEFT prefix-tuning folder for <paramref name="model"/>; every mismatch is named in one error.</summary>
    public static PeftPrefixAdapter Load(string folder, LlamaConfig model) =>
        InputGuard.Parse(folder, () => LoadCore(folder, model));

    /// <summary>Reads a PEFT prefix-tuning folder for <paramref name="model"/> (as the other variant loaders take it).</summary>
    public static PeftPrefixAdapter Load(string folder, LlamaModel model) => Load(folder, model.Config);

    private static PeftPrefixAdapter LoadCore(string folder, LlamaConfig model)
    {
        string configPath = Path.Combine(folder, PeftLoraAdapter.ConfigFile);
        var o = JsonConfigFile.Read(folder, PeftLoraAdapter.ConfigFile, "PEFT adapter");

        int l = model.NumHiddenLayers, tokenDim = model.NumKeyValueHeads * model.HeadDim;
        var problems = new List<string>();
        if (o["peft_type"]?.Value<string>() != "PREFIX_TUNING") problems.Add($"peft_type is '{o["peft_type"]}', this reader takes PREFIX_TUNING");
        int p = o["num_virtual_tokens"]?.Value<int>() ?? 0;
        if (p <= 0) problems.Add("num_virtual_tokens is missing or not positive");
        if (o["prefix_projection"]?.Value<bool>() == true) problems.Add("prefix_projection = true (the reparameterising MLP) is not supported");
        if (o["num_layers"] is { } nl && nl.Value<int>() != l) problems.Add($"num_layers is {nl}, the model has {l}");
        if (o["token_dim"] is { } td && td.Value<int>() != tokenDim) problems.Add($"token_dim is {td}, the model's keys are {tokenDim} wide (num_key_value_heads x head_dim)");
        if (o["num_transformer_submodules"] is { } ns && ns.Value<int>() != 1) problems.Add($"num_transformer_submodules is {ns}, a decoder has 1");
        string weights = Path.Combine(folder, PeftLoraAdapter.WeightsFile);
        if (!File.Exists(weights)) problems.Add($"no {PeftLoraAdapter.WeightsFile}");
        if (problems.Count > 0) throw new PeftSharpInputException($"{folder}: the prefix adapter does not fit the model ({problems.Count} problems): {string.Join("; ", problems)}");
        using var file = SafeTensorsFile.Open(weights);
        if (!file.Contains(Key)) throw new PeftSharpInputException($"{weights}: no {Key} tensor");
        var expected = new long[] { p, l * 2 * tokenDim };
        if (!file[Key].Shape.SequenceEqual(expected)) throw new PeftSharpInputException($"{weights}: {Key} is {file[Key].ShapeText}, expected [{p}, {l * 2 * tokenDim}]");
        var extra = file.Tensors.Where(t => t.Name != Key).Select(t => t.Name).ToList();
        if (extra.Count > 0) throw new PeftSharpInputException($"{weights}: unexpected tensors {string.Join(", ", extra)}");
        var emb = file.ReadFloats(Key);
        var keys = Enumerable.Range(0, l).Select(_ => new float[p * tokenDim]).ToArray();
        var values = Enumerable.Range(0, l).Select(_ => new float[p * tokenDim]).ToArray();
        for (int t = 0; t < p; t++)
        {
            for (int layer = 0; layer < l; layer++)
            {
                emb.AsSpan(((t * l + layer) * 2) * tokenDim, tokenDim).CopyTo(keys[layer].AsSpan(t * tokenDim));
                emb.AsSpan(((t * l + layer) * 2 + 1) * tokenDim, tokenDim).CopyTo(values[layer].AsSpan(t * tokenDim));
            }
        }

        return new PeftPrefixAdapter(p, keys, values, o["base_model_name_or_path"]?.Value<string>());
    }
}
