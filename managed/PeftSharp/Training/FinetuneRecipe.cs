using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// A model set up for a fine-tuning method by <see cref="Finetune.Prepare"/>: what trains, a line that says so, and
/// how its output is written (a PEFT adapter, adapters per task, a prefix adapter, a sparse delta, or the model).
/// </summary>
public sealed class FinetuneRecipe
{
    private readonly LlamaModel model;

    internal FinetuneRecipe(LlamaModel model, FinetuneOptions options)
    {
        this.model = model;
        Options = options;
    }

    public FinetuneOptions Options { get; }

    /// <summary>What the method trains, in one line (null for a full fine-tune).</summary>
    public string? Description { get; internal set; }

    /// <summary>What <see cref="Save"/> writes, for messages.</summary>
    public string Output { get; internal set; } = "model";

    /// <summary>The LoRA adapter's config as it is saved (its base_model_name_or_path set), for the LoRA method.</summary>
    public LoraAdapterConfig? Adapter { get; internal set; }

    /// <summary>Sparse fine-tuning's trainable entries per parameter (null for other methods).</summary>
    public IReadOnlyDictionary<string, int[]>? Masks { get; internal set; }

    /// <summary>The masks the run ended with (they move under regrowth); set by <see cref="Finetune.Train"/>.</summary>
    public IReadOnlyDictionary<string, int[]>? FinalMasks { get; internal set; }

    /// <summary>Parameters that train now.</summary>
    public long Trainable => model.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);

    /// <summary>Writes the method's output to a folder (the model as a Hugging Face folder when null).</summary>
    public Action<string>? Save { get; internal set; }
}
