using PeftSharp.Formats;

namespace PeftSharp.Training;

/// <summary>
/// A training recipe beyond <see cref="TrainOptions"/>: the method, its settings and the optimizer. The <c>peft</c>
/// host's flags map onto it one to one; <see cref="Validate"/> names the option that is wrong.
/// </summary>
public sealed record FinetuneOptions
{
    public FinetuneMethod Method { get; init; } = FinetuneMethod.Full;

    /// <summary>Parameters whose name matches one of these globs do not train.</summary>
    public IReadOnlyList<string> Freeze { get; init; } = Array.Empty<string>();

    /// <summary>Layer-wise learning-rate decay factor in (0, 1] (1: off).</summary>
    public float LayerDecay { get; init; } = 1f;

    /// <summary>Keep an exponential moving average of the weights with this decay and save it (0: off).</summary>
    public float EmaDecay { get; init; }

    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;

    /// <summary>SGD momentum (0: plain SGD).</summary>
    public float Momentum { get; init; } = 0.9f;

    /// <summary>The adapter to train, for <see cref="FinetuneMethod.Lora"/>.</summary>
    public LoraAdapterConfig? Lora { get; init; }

    /// <summary>Train B only (A frozen at its random init).</summary>
    public bool LoraBOnly { get; init; }

    public LoraInit LoraInit { get; init; } = LoraInit.Default;

    /// <summary>One LoRA adapter per task name, all trained in the same batches (adapter sets); null: one adapter.</summary>
    public IReadOnlyList<string>? AdapterPerTask { get; init; }

    /// <summary>Sparse fine-tuning: the fraction of each tensor's entries that train.</summary>
    public double Density { get; init; } = 0.01;

    public MaskSource MaskSource { get; init; } = MaskSource.Gradient;

    /// <summary>SpIEL drop-and-regrow interval for sparse fine-tuning (0: fixed mask).</summary>
    public int RegrowEvery { get; init; }

    /// <summary>GaLore's projection rank r and refresh interval T (steps).</summary>
    public int GaLoreRank { get; init; } = 8;

    public int GaLoreEvery { get; init; } = 200;

    /// <summary>GaLore+'s cross-head projection for attention weights: the hidden-side basis from a few heads' gradient, shared by all heads.</summary>
    public bool GaLoreCrossHead { get; init; }

    /// <summary>MeZO's perturbation scale eps (the paper's 1e-3).</summary>
    public float MezoEpsilon { get; init; } = 1e-3f;

    /// <summary>Prefix tuning's virtual tokens per layer.</summary>
    public int VirtualTokens { get; init; } = 8;

    /// <summary>Prefix tuning's reparameterising MLP width (0: the keys and values train directly).</summary>
    public int PrefixProjection { get; init; }

    /// <summary>Throws an ArgumentException or NotSupportedException naming the option that does not fit <see cref="Method"/>.</summary>
    public void Validate(TrainOptions train)
    {
        if (Method != FinetuneMethod.Sparse && RegrowEvery != 0) throw new ArgumentException($"RegrowEvery {RegrowEvery} applies to FinetuneMethod.Sparse");
        if (RegrowEvery < 0) throw new ArgumentException($"RegrowEvery {RegrowEvery}: must be >= 0");
        if (Density is <= 0 or > 1) throw new ArgumentException($"Density {Density}: must be in (0, 1]");
        if (Method != FinetuneMethod.Prefix && PrefixProjection != 0) throw new ArgumentException($"PrefixProjection {PrefixProjection} applies to FinetuneMethod.Prefix");
        if (PrefixProjection < 0) throw new ArgumentException($"PrefixProjection {PrefixProjection}: must be >= 0");
        if (VirtualTokens <= 0) throw new ArgumentException($"VirtualTokens {VirtualTokens}: must be positive");
        if (LayerDecay is <= 0f or > 1f) throw new ArgumentException($"LayerDecay {LayerDecay}: must be in (0, 1]");
        if (EmaDecay is < 0f or >= 1f) throw new ArgumentException($"EmaDecay {EmaDecay}: must be in [0, 1)");
        if (!(MezoEpsilon > 0f) || !float.IsFinite(MezoEpsilon)) throw new ArgumentException($"MezoEpsilon {MezoEpsilon}: must be positive and finite");
        if (Method == FinetuneMethod.Mezo && (train.GradAccumulation > 1 || train.GroupCompletions || Freeze.Count > 0))
        {
            throw new NotSupportedException("MeZO takes one batch a step over every parameter: not with gradient accumulation, grouped completions or frozen parameters");
        }
        bool loraOnly = LoraBOnly || LoraInit != LoraInit.Default || train.ChainEvery != 0 || AdapterPerTask != null;
        if (Method == FinetuneMethod.Lora && Lora == null) throw new ArgumentException("FinetuneMethod.Lora needs a LoraAdapterConfig (Lora)");
        if (Method != FinetuneMethod.Lora && (Lora != null
            || loraOnly)) throw new ArgumentException("Lora, LoraBOnly, LoraInit, AdapterPerTask and TrainOptions.ChainEvery apply to FinetuneMethod.Lora");
        if (train.ChainEvery < 0) throw new ArgumentException($"ChainEvery {train.ChainEvery}: must be >= 0");
        if (Lora is not { } lora) return;
        if (lora.LoraDropout is < 0f or >= 1f) throw new ArgumentException($"lora_dropout {lora.LoraDropout}: must be in [0, 1)");
        if (LoraInit == LoraInit.LoraGa && (lora.UseDora || LoraBOnly)) throw new NotSupportedException("LoRA-GA initialisation combines with neither DoRA nor B-only training");
        if (AdapterPerTask != null && (LoraInit != LoraInit.Default || LoraBOnly || lora.UseDora || train.ChainEvery > 0 || train.GroupCompletions))
        {
            throw new NotSupportedException("one adapter per task trains plain LoRA (rank, alpha, targets, rsLoRA, dropout); not with DoRA, B-only, LoRA-GA, chain of LoRA or grouped completions");
        }
    }
}
