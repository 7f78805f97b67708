using System.Text;

namespace PeftSharp.Data;

/// <summary>
/// The built-in tokenizer: one token per UTF-8 byte (0..255) plus BOS = 256, EOS = 257, PAD = 258. Needs no files,
/// round-trips any text exactly, and fits the tiny configs' vocabulary of 259.
/// </summary>
public sealed class ByteTokenizer : ITokenizer
{
    /// <summary>The one instance (it holds no state).</summary>
    public static readonly ByteTokenizer Instance = new();

    public const int Bos = 256;
    public const int Eos = 257;
    public const int Pad = 258;
    public const int VocabSize = 259;

    string ITokenizer.Name => "byte";

    int ITokenizer.VocabSize => VocabSize;

    int? ITokenizer.Bos => Bos;

    int? ITokenizer.Eos => Eos;

    int ITokenizer.Pad => Pad;

    public int[] Encode(string text) => Encoding.UTF8.GetBytes(text).Select(b => (int)b).ToArray();

    /// <summary>Decodes byte tokens; special tokens are dropped, invalid UTF-8 becomes U+FFFD.</summary>
    public string Decode(IEnumerable<int> tokens)
    {
        var bytes = tokens.Where(t => t is >= 0 and < 256).Select(t => (byte)t).ToArray();
        return Encoding.UTF8.GetString(bytes);
    }
}
