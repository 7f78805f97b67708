using PeftSharp.Formats;
using System.Text;
using System.Text.Json;

namespace PeftSharp.Data;

/// <summary>Training data from users' files: JSONL prompt/completion pairs, or plain UTF-8 text.</summary>
public static class DataFiles
{
    /// <summary>
    /// Reads JSONL: <c>{"prompt": ..., "completion": ...}</c> lines (loss on completions), or <c>{"text": ...}</c>
    /// lines, each a document (as Hugging Face datasets write text corpora; cut into windows by <see cref="Windows"/>).
    /// Blank lines are skipped; every line must be of the same kind. A malformed line is an error naming the file and
    /// the line number.
    /// </summary>
    public static List<Example> ReadJsonl(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        var result = new List<Example>();
        int lineNumber = 0;
        bool? documents = null;
        foreach (var line in File.ReadLines(path, Encoding.UTF8))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) throw new PeftSharpInputException("not a JSON object");
                bool isText = root.TryGetProperty("text", out var t) && !root.TryGetProperty("prompt", out _);
                if (documents is bool d && d != isText)
                {
                    throw new PeftSharpInputException($"a {(isText ? "\"text\"" : "\"prompt\"/\"completion\"")} line among {(d ? "\"text\"" : "\"prompt\"/\"completion\"")} lines; " +
                        "use one kind per file");
                }

                documents = isText;
                if (isText)
                {
                    result.Add(new Example(TextTask, "", t.ValueKind == JsonValueKind.String ? t.GetString()! : throw new PeftSharpInputException("field \"text\" is not a string")));
                    continue;
                }

                string prompt = root.TryGetProperty("prompt", out var p) && p.ValueKind == JsonValueKind.String
                    ? p.GetString()!
                    : throw new PeftSharpInputException("missing string field \"prompt\" (or a \"text\" document)");
                string completion = root.TryGetProperty("completion", out var c) && c.ValueKind == JsonValueKind.String
                    ? c.GetString()!
                    : throw new PeftSharpInputException("missing string field \"completion\"");
                result.Add(new Example("jsonl", prompt, completion));
            }
            catch (Exception e) when (e is PeftSharpInputException || InputGuard.IsParseFailure(e))
            {
                throw new PeftSharpInputException($"{path}:{lineNumber}: {e.Message}", e);
            }
        }

        if (result.Count == 0) throw new PeftSharpInputException($"{path}: no examples");
        return result;
    }

    /// <summary>The task name of documents (text files, JSONL "text" lines) and the windows cut from them.</summary>
    public const string TextTask = "text";

    /// <summary>Reads a UTF-8 text file as one document (loss on all of it, once cut into windows by <see cref="Windows"/>).</summary>
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
            throw new PeftSharpInputException($"{path}: not valid UTF-8 at byte {e.Index}", e);
        }

        text = text.TrimStart('\uFEFF').Replace("\r\n", "\n");
        if (string.IsNullOrWhiteSpace(text)) throw new PeftSharpInputException($"{path}: no text");
        return new List<Example> { new(TextTask, "", text) };
    }

    /// <summary>
    /// Documents as a language-model trainer cuts them: each tokenized as [BOS] text [EOS], all concatenated, and the
    /// stream cut into windows of <paramref name="seqLen"/> + 1 ids that overlap by one, so every id after the first
    /// is a target exactly once and no document has to fit one window. The last window may be shorter (padded when
    /// batched); a window of one id (nothing to predict) is dropped.
    /// </summary>
    public static List<Example> Windows(IEnumerable<Example> documents, ITokenizer tokenizer, int seqLen)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(seqLen);
        var stream = new List<int>();
        foreach (var d in documents)
        {
            if (d.Ids != null || d.Prompt.Length > 0) throw new ArgumentException("Windows cuts documents (no prompt), not prompt/completion examples");
            stream.AddRange(tokenizer.EncodeStart(d.Completion));
            if (tokenizer.Eos is int eos) stream.Add(eos);
        }

        var windows = new List<Example>();
        for (int start = 0; start + 1 < stream.Count; start += seqLen)
        {
            int end = Math.Min(stream.Count, start + seqLen + 1);
            windows.Add(new Example(TextTask, "", "") { Ids = stream.GetRange(start, end - start).ToArray() });
        }

        return windows;
    }

    /// <summary>
    /// Splits off <paramref name="fraction"/> of <paramref name="examples"/> (rounded, at least one) as held-out data,
    /// chosen by a seeded shuffle; both parts keep the file's order. A fraction that leaves nothing to train on is refused.
    /// </summary>
    public static (List<Example> Train, List<Example> HeldOut) HoldOut(IReadOnlyList<Example> examples, double fraction, int seed)
    {
        if (!(fraction > 0 && fraction < 1)) throw new ArgumentException($"--eval-split {fraction}: must be in (0, 1)");
        int held = Math.Max(1, (int)Math.Round(fraction * examples.Count));
        if (held >= examples.Count) throw new ArgumentException($"--eval-split {fraction} of {examples.Count} examples leaves none to train on");
        var order = Enumerable.Range(0, examples.Count).ToArray();
        new Random(seed).Shuffle(order);
        var isHeld = new bool[examples.Count];
        foreach (int i in order.Take(held)) isHeld[i] = true;
        return (examples.Where((_, i) => !isHeld[i]).ToList(), examples.Where((_, i) => isHeld[i]).ToList());
    }
}
