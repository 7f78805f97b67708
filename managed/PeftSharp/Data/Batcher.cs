namespace PeftSharp.Data;

/// <summary>
/// Turns examples into fixed-length training rows: [BOS] prompt completion [EOS], padded. Targets are the next
/// token; positions that should not be trained (padding, and the prompt when <c>completionOnly</c>) get -100.
/// </summary>
public static class Batcher
{
    public const int IgnoreIndex = -100;

    public static (int[] Tokens, int[] Targets) Encode(IReadOnlyList<Example> examples, ITokenizer tokenizer, int seqLen, bool completionOnly)
    {
        var tokens = new int[examples.Count * seqLen];
        var targets = new int[examples.Count * seqLen];
        Array.Fill(tokens, tokenizer.Pad);
        Array.Fill(targets, IgnoreIndex);
        for (int r = 0; r < examples.Count; r++)
        {
            if (examples[r].Ids is int[] window)
            {
                // A document window: ids as cut, each position predicting the next (no prompt to mask).
                if (window.Length > seqLen + 1) throw new ArgumentException($"a {examples[r].Task} window of {window.Length} ids exceeds the sequence length {seqLen} + 1");
                for (int i = 0; i + 1 < window.Length; i++)
                {
                    tokens[r * seqLen + i] = window[i];
                    targets[r * seqLen + i] = window[i + 1];
                }

                continue;
            }

            var prompt = tokenizer.Encode(examples[r].Prompt);
            var seq = tokenizer.EncodeStart("");
            int start = seq.Count;
            seq.AddRange(prompt);
            seq.AddRange(tokenizer.EncodeEnd(examples[r].Completion));
            if (seq.Count > seqLen + 1)
            {
                throw new ArgumentException($"example '{examples[r].Prompt}{examples[r].Completion}' needs {seq.Count - 1} positions, more than the sequence length {seqLen}");
            }

            int firstTrained = completionOnly ? start + prompt.Length - 1 : 0; // position whose target is the first completion token
            for (int i = 0; i + 1 < seq.Count; i++)
            {
                tokens[r * seqLen + i] = seq[i];
                if (i >= firstTrained) targets[r * seqLen + i] = seq[i + 1];
            }
        }

        return (tokens, targets);
    }
}
