using PeftSharp.Formats;
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
                if (root.ValueKind != JsonValueKind.Object) throw new PeftSharpInputException("not a JSON object");
                string prompt = root.TryGetProperty("prompt", out var p) && p.ValueKind == JsonValueKind.String
                    ? p.GetString()!
                    : throw new PeftSharpInputException("missing string field \"prompt\"");
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
            throw new PeftSharpInputException($"{path}: not valid UTF-8 at byte {e.Index}", e);
        }

        var parts = text.Replace("\r\n", "\n").Split("\n\n", StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0) throw new PeftSharpInputException($"{path}: no text");
        return parts.Select(p => new Example("text", "", p)).ToList();
    }
}
