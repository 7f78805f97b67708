namespace PeftSharp.Training;

/// <summary>What a fine-tune trains (1-bit deltas come from compressing a full fine-tune, <c>BitDelta.Compress</c>).</summary>
public enum FinetuneMethod
{
    /// <summary>Every parameter (or those not frozen).</summary>
    Full,

    /// <summary>LoRA family adapters over the frozen base (LoRA, rsLoRA, DoRA, B-only, LoRA-GA, chain of LoRA, adapter sets).</summary>
    Lora,

    /// <summary>Prefix tuning's virtual tokens (optionally through P-tuning v2's MLP).</summary>
    Prefix,

    /// <summary>IA3: learned vectors scaling k_proj's and v_proj's outputs and down_proj's input (PEFT's Llama defaults).</summary>
    Ia3,

    /// <summary>LN tuning: only the norm weights train (PEFT's Llama default: input, post-attention and final norms).</summary>
    LnTuning,

    /// <summary>SSF: a learned scale and shift after every linear module.</summary>
    Ssf,

    /// <summary>MeZO: zeroth-order SGD from two forward passes over every parameter (memory of inference).</summary>
    Mezo,

    /// <summary>A fixed fraction of each tensor's entries, chosen by a mask (optionally regrown, SpIEL).</summary>
    Sparse,
}
