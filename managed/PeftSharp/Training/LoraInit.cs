namespace PeftSharp.Training;

/// <summary>How LoRA's factors start (PEFT's <c>init_lora_weights</c>).</summary>
public enum LoraInit
{
    /// <summary>A from PEFT's default (kaiming-uniform), B zero.</summary>
    Default,

    /// <summary>LoRA-GA: A and B from the SVD of the full gradient on a few batches (the base absorbs their product).</summary>
    LoraGa,
}
