namespace PeftSharp.Training;

/// <summary>Settings of a training run.</summary>
public sealed record TrainOptions
{
    public int Steps { get; init; } = 200;
    public int BatchSize { get; init; } = 16;
    public int SeqLen { get; init; } = 40;
    public int GradAccumulation { get; init; } = 1;
    public float LearningRate { get; init; } = 3e-3f;
    public int WarmupSteps { get; init; } = 20;
    public float WeightDecay { get; init; } = 0.01f;
    /// <summary>Global gradient-norm clip; 0 disables.</summary>
    public double ClipNorm { get; init; } = 1.0;
    /// <summary>Clip each parameter's gradient on its own instead of the global norm.</summary>
    public bool ClipPerParameter { get; init; }
    /// <summary>Train on completions only (fine-tuning), or on every token (pre-training).</summary>
    public bool CompletionOnly { get; init; }
    public int CheckpointEvery { get; init; }
    /// <summary>Chain of LoRA: every this many steps, merge the LoRA layers into the base and start fresh ones (0: off).</summary>
    public int ChainEvery { get; init; }
    /// <summary>Prefix Grouper: examples of a batch that share a prompt train as one prompt with several completions (loss on completions).</summary>
    public bool GroupCompletions { get; init; }
    public int Seed { get; init; } = 1;
    /// <summary>
    /// A step whose loss or gradient norm is NaN or infinite is skipped (no update; its data is consumed) instead of
    /// stopping the run with <see cref="TrainingDivergedException"/>. Either way no non-finite weight is written.
    /// </summary>
    public bool SkipNonFinite { get; init; }

    /// <summary>
    /// What else defines the run beside these options (the data, the method and its settings, as the caller names
    /// them): recorded in each checkpoint with the options that shape the trajectory, and compared on resume, so a
    /// resume with other data, another method or another batch size is refused with what differs.
    /// </summary>
    public IReadOnlyDictionary<string, string> RunSettings { get; init; } = new Dictionary<string, string>();

    /// <summary>
    /// The settings a resumed run must share with its checkpoint: <see cref="RunSettings"/> and the options that shape
    /// the trajectory (not Steps, warmup or checkpointing, which a longer continuation may change).
    /// </summary>
    public SortedDictionary<string, string> ResumeSettings()
    {
        var all = new SortedDictionary<string, string>(RunSettings.ToDictionary(kv => kv.Key, kv => kv.Value), StringComparer.Ordinal)
        {
            ["batch_size"] = $"{BatchSize}", ["seq_len"] = $"{SeqLen}", ["grad_accumulation"] = $"{GradAccumulation}", ["learning_rate"] = Exact(LearningRate),
            ["weight_decay"] = Exact(WeightDecay), ["clip_norm"] = Exact(ClipNorm),
            ["clip_per_parameter"] = $"{ClipPerParameter}", ["completion_only"] = $"{CompletionOnly}", ["chain_every"] = $"{ChainEvery}", ["group_completions"] = $"{GroupCompletions}",
            ["seed"] = $"{Seed}",
        };
        return all;
    }

    private static string Exact(double v) => v.ToString("R", System.Globalization.CultureInfo.InvariantCulture);
}
