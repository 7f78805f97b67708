namespace PeftSharp.Data;

public static class TokenizerExtensions
{
    /// <summary>[BOS] text, the way a prompt or training row starts.</summary>
    public static List<int> EncodeStart(this ITokenizer tokenizer, string text)
    {
        var seq = new List<int>();
        if (tokenizer.Bos is int bos) seq.Add(bos);
        seq.AddRange(tokenizer.Encode(text));
        return seq;
    }

    /// <summary>text [EOS]: a training completion.</summary>
    public static int[] EncodeEnd(this ITokenizer tokenizer, string text)
    {
        var ids = tokenizer.Encode(text);
        return tokenizer.Eos is int eos ? ids.Append(eos).ToArray() : ids;
    }
}
