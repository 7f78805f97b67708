namespace PeftSharp.Data;

/// <summary>
/// Text to token ids and back, as the trainer, evaluator and generators use it: <see cref="Encode"/> adds no special
/// tokens; a sequence starts with <see cref="Bos"/> when the tokenizer has one, a training completion ends with
/// <see cref="Eos"/>, and generation stops there. <see cref="ByteTokenizer"/> is built in; <see cref="HfTokenizer"/>
/// reads a model folder's tokenizer.json or tokenizer.model.
/// </summary>
public interface ITokenizer
{
    /// <summary>What it is, for messages: "byte", "tokenizer.json (byte-level BPE)", ...</summary>
    string Name { get; }

    /// <summary>One more than the largest id it produces; must not exceed the model's vocab_size.</summary>
    int VocabSize { get; }

    /// <summary>The id every sequence starts with, or null when the tokenizer adds none (GPT-2 style).</summary>
    int? Bos { get; }

    /// <summary>End of sequence: appended to training completions, stops generation. Null when the tokenizer has none.</summary>
    int? Eos { get; }

    /// <summary>Filler for padded positions (never trained on).</summary>
    int Pad { get; }

    int[] Encode(string text);

    /// <summary>Text of the ids; special tokens are left out.</summary>
    string Decode(IEnumerable<int> ids);
}
