namespace PeftSharp;

/// <summary>
/// The one exception PeftSharp throws for bad input: a malformed, truncated or inconsistent file (config.json,
/// safetensors, tokenizer.json, adapter and delta folders, mergekit YAML, data and request files, checkpoints) or
/// data that cannot be used as given. The message names the file and, where it can, the key, line or byte offset.
/// A well-formed input that uses a feature PeftSharp does not implement is refused with
/// <see cref="NotSupportedException"/> instead; a missing file or folder is a <see cref="FileNotFoundException"/> or
/// <see cref="DirectoryNotFoundException"/>.
/// </summary>
public sealed class PeftSharpInputException : Exception
{
    public PeftSharpInputException(string message)
        : base(message)
    {
    }

    public PeftSharpInputException(string message, Exception? inner)
        : base(message, inner)
    {
    }
}
