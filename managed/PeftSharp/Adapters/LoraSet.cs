namespace PeftSharp.Adapters;

/// <summary>An adapter trained together with others in one batch (<c>LlamaModel.AddLoraSet</c>): its name, config and layers by module.</summary>
public sealed record LoraSet(string Name, PeftSharp.Formats.LoraAdapterConfig Config, IReadOnlyDictionary<string, LoraLayer> Layers);
