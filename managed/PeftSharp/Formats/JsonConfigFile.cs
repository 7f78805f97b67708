using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftSharp.Formats;

/// <summary>The small JSON config beside an adapter or delta: read with errors that name the file and the folder's kind.</summary>
public static class JsonConfigFile
{
    public static JsonObject Read(string folder, string file, string kind)
    {
        string path = Path.Combine(folder, file);
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: no {file}; is this a {kind} folder?", path);
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new PeftSharpInputException($"{path}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new PeftSharpInputException($"{path}: not valid JSON: {e.Message}", e);
        }
    }

    /// <summary>Names as a JSON array in ordinal order (the lists a folder's config records).</summary>
    public static JsonArray SortedNames(IEnumerable<string> names) =>
        new(names.OrderBy(k => k, StringComparer.Ordinal).Select(k => (JsonNode)JsonValue.Create(k)!).ToArray());

    /// <summary>A string field the config must have; its absence is an error naming the file and the field.</summary>
    public static string RequiredString(JsonObject o, string key, string path) =>
        o[key]?.Value<string>() ?? throw new PeftSharpInputException($"{path}: no {key}");
}
