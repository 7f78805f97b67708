using PeftSharp.Formats;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftSharp.Serving;

/// <summary>
/// Generation requests as JSONL, one object per line: {"prompt": "...", "variant": "name"} with optional
/// "max_tokens", "temperature", "top_k", "top_p", "seed", and "shared_prefix" (text before the prompt that requests
/// giving the same one read from one shared KV cache; a list of texts makes a chain of levels, root first); "adapter" and "delta" are accepted in place of "variant".
/// A missing variant (or "base") is the base model. Malformed lines are an error naming the file and line.
/// </summary>
public static class RequestFile
{
    public static IReadOnlyList<GenerationRequest> Read(string path, GenerationRequest defaults) =>
        InputGuard.Parse(path, () => ReadCore(path, defaults));

    private static IReadOnlyList<GenerationRequest> ReadCore(string path, GenerationRequest defaults)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"requests file {path} does not exist", path);
        var list = new List<GenerationRequest>();
        int line = 0;
        foreach (var raw in File.ReadLines(path))
        {
            line++;
            if (string.IsNullOrWhiteSpace(raw)) continue;
            string where = $"{path}:{line}";
            JsonObject o;
            try
            {
                o = JsonNode.Parse(raw) as JsonObject ?? throw new PeftSharpInputException($"{where}: not a JSON object");
            }
            catch (JsonException e)
            {
                throw new PeftSharpInputException($"{where}: not valid JSON: {e.Message}", e);
            }

            var unknown = o.Select(p => p.Key).Except(new[] { "prompt", "variant", "adapter", "delta", "max_tokens", "temperature", "top_k", "top_p", "seed", "id", "shared_prefix" }).ToList();
            if (unknown.Count > 0) throw new PeftSharpInputException($"{where}: unknown keys {string.Join(", ", unknown)}");
            try
            {
                string prompt = o["prompt"]?.Value<string>() ?? throw new PeftSharpInputException($"{where}: no \"prompt\"");
                var names = new[] { "variant", "adapter", "delta" }.Where(k => o[k] != null).ToList();
                if (names.Count > 1) throw new PeftSharpInputException($"{where}: give one of {string.Join(", ", names)}, not several");
                var r = defaults with
                {
                    Prompt = prompt,
                    Variant = names.Count == 1 ? o[names[0]]!.Value<string>() : null,
                    MaxTokens = o["max_tokens"]?.Value<int>() ?? defaults.MaxTokens,
                    Temperature = o["temperature"] is { } t ? (float)t.Value<double>() : defaults.Temperature,
                    TopK = o["top_k"]?.Value<int>() ?? defaults.TopK,
                    TopP = o["top_p"] is { } p ? (float)p.Value<double>() : defaults.TopP,
                    Seed = o["seed"]?.Value<int>() ?? defaults.Seed + list.Count,
                    SharedPrefix = o["shared_prefix"] is JsonValue sp ? sp.Value<string>() : null,
                    SharedPrefixes = o["shared_prefix"] is JsonArray levels ? levels.Select(l => l!.Value<string>()).ToArray() : null,
                };
                if (r.MaxTokens <= 0) throw new PeftSharpInputException($"{where}: max_tokens {r.MaxTokens} must be positive");
                if (r.Temperature < 0) throw new PeftSharpInputException($"{where}: temperature {r.Temperature} must be >= 0");
                if (r.TopP is <= 0 or > 1) throw new PeftSharpInputException($"{where}: top_p {r.TopP} must be in (0, 1]");
                list.Add(r);
            }
            catch (Exception e) when (e is InvalidOperationException or FormatException)
            {
                throw new PeftSharpInputException($"{where}: a value has the wrong type: {e.Message}", e);
            }
        }

        if (list.Count == 0) throw new PeftSharpInputException($"{path}: no requests");
        return list;
    }

    /// <summary>name=DIR,name=DIR (also repeatable) into (name, folder) pairs; a bad entry or a repeated name is an error.</summary>
    public static IReadOnlyList<(string Name, string Folder)> ParseNamedFolders(string flag, IEnumerable<string> values)
    {
        var result = new List<(string, string)>();
        foreach (var entry in values.SelectMany(v => v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)))
        {
            int eq = entry.IndexOf('=');
            if (eq <= 0 || eq == entry.Length - 1) throw new ArgumentException($"{flag} '{entry}': expected name=FOLDER");
            string name = entry[..eq], folder = entry[(eq + 1)..];
            if (result.Any(r => r.Item1 == name)) throw new ArgumentException($"{flag}: the name '{name}' is given twice");
            if (!Directory.Exists(folder)) throw new ArgumentException($"{flag} {name}={folder}: no such folder");
            result.Add((name, folder));
        }

        return result;
    }
}
