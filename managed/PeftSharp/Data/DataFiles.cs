using System.Text;
using System.Text.Json;

namespace PeftSharp.Data;

/// <summary>Training data from users' files: JSONL prompt/completion pairs, or plain UTF-8 text.</summary>
public static class DataFiles
{
    /// <summary>
    /// Reads <c>{"prompt": ..., "completion": ...}</c> lines (blank lines skipped). A malformed line is an error
    /// naming the file and the line number.
    /// </summary>
    public static List<Example> ReadJsonl(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        var result = new List<Example>();
        int lineNumber = 0;
        foreach (var line in File.ReadLines(path, Encoding.UTF8))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException("not a JSON object");
                string prompt = root.TryGetProperty("prompt", out var p) && p.ValueKind == JsonValueKind.String
                    ? p.GetString()!
                    : throw new InvalidDataException("missing string field \"prompt\"");
                string completion = root.TryGetProperty("completion", out var c) && c.ValueKind == JsonValueKind.String
                    ? c.GetString()!
                    : throw new InvalidDataException("missing string field \"completion\"");
                result.Add(new Example("jsonl", prompt, completion));
            }
            catch (Exception e) when (e is JsonException or InvalidDataException)
            {
                throw new InvalidDataException($"{path}:{lineNumber}: {e.Message}", e);
            }
        }

        if (result.Count == 0) throw new InvalidDataException($"{path}: no examples");
        return result;
    }

    /// <summary>Reads a UTF-8 text file as one example per non-empty paragraph (loss on all of it).</summary>
    public static List<Example> ReadText(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        string text;
        try
        {
            text = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(File.ReadAllBytes(path));
        }
        catch (DecoderFallbackException e)
        {
            throw new InvalidDataException($"{path}: not valid UTF-8 at byte {e.Index}", e);
        }

        var parts = text.Replace("\r\n", "\n").Split("\n\n", StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0) throw new InvalidDataException($"{path}: no text");
        return parts.Select(p => new Example("text", "", p)).ToList();
    }
}

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
