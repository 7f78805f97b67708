using PeftSharp.Model;

namespace PeftSharp.Variants;

/// <summary>
/// A variant of a base model read from (or written to) a folder: a PEFT LoRA or DoRA adapter, a PEFT prefix-tuning
/// adapter, a 1-bit delta or a sparse delta. <see cref="VariantFolder.Load"/> reads any of them; a
/// <c>VariantSet</c> serves them side by side; <see cref="MergeInto"/> folds one into a model's weights.
/// </summary>
public interface IVariant
{
    /// <summary>What it is, for messages ("LoRA", "DoRA", "prefix tuning", "1-bit delta", "sparse delta").</summary>
    string Kind { get; }

    /// <summary>What it holds, in a few words (modules, rank, entries), for messages.</summary>
    string Summary { get; }

    /// <summary>Changes <paramref name="model"/> (the base it was made for) into the variant; an error when the kind cannot be merged.</summary>
    void MergeInto(LlamaModel model);

    /// <summary>Writes it as its folder format (each file atomically).</summary>
    void Save(string folder, LlamaConfig config);
}
