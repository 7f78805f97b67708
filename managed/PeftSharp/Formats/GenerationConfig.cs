using System.Text.Json.Nodes;

namespace PeftSharp.Formats;

/// <summary>The sampling defaults of a Hugging Face folder's generation_config.json (all optional).</summary>
/// <param name="EosTokenIds">eos_token_id: one id or a list (Llama 3.1 and 3.2 list three); generation stops at any of them.</param>
public sealed record GenerationConfig(bool? DoSample, float? Temperature, int? TopK, float? TopP, int? MaxNewTokens, IReadOnlyList<int>? EosTokenIds = null)
{
    public const string FileName = "generation_config.json";

    public static GenerationConfig Read(string folder) =>
        InputGuard.Parse(Path.Combine(folder, FileName), () => ReadCore(folder));

    private static GenerationConfig ReadCore(string folder)
    {
        string path = Path.Combine(folder, FileName);
        if (!File.Exists(path)) return new GenerationConfig(null, null, null, null, null);
        JsonObject o;
        try
        {
            o = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new PeftSharpInputException($"{path}: not a JSON object");
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new PeftSharpInputException($"{path}: not valid JSON: {e.Message}", e);
        }

        return new GenerationConfig(
            o["do_sample"]?.Value<bool>(),
            o["temperature"] is { } t ? (float)t.Value<double>() : null,
            o["top_k"]?.Value<int>(),
            o["top_p"] is { } p ? (float)p.Value<double>() : null,
            o["max_new_tokens"]?.Value<int>(),
            EosIds(o["eos_token_id"], path));
    }

    /// <summary>eos_token_id as an id, a list of ids or null; anything else names the file and the key.</summary>
    private static IReadOnlyList<int>? EosIds(JsonNode? node, string path)
    {
        static int? Id(JsonNode? n) => n is JsonValue v && v.TryGetValue(out int id) && id >= 0 ? id : null;
        return node switch
        {
            null => null,
            JsonArray a => a.Select(n => Id(n) ?? throw new PeftSharpInputException($"{path}: eos_token_id holds {n?.ToJsonString() ?? "null"}, not a token id")).ToArray(),
            _ => Id(node) is int one ? new[] { one } : throw new PeftSharpInputException($"{path}: eos_token_id is {node.ToJsonString()}, not a token id or a list of them"),
        };
    }
}
