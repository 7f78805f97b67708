using System.Text.Json.Nodes;

namespace PeftSharp.Formats;

/// <summary>The sampling defaults of a Hugging Face folder's generation_config.json (all optional).</summary>
public sealed record GenerationConfig(bool? DoSample, float? Temperature, int? TopK, float? TopP, int? MaxNewTokens)
{
    public const string FileName = "generation_config.json";

    public static GenerationConfig Read(string folder)
    {
        string path = Path.Combine(folder, FileName);
        if (!File.Exists(path)) return new GenerationConfig(null, null, null, null, null);
        JsonObject o;
        try
        {
            o = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new InvalidDataException($"{path}: not a JSON object");
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new InvalidDataException($"{path}: not valid JSON: {e.Message}", e);
        }

        return new GenerationConfig(
            o["do_sample"]?.GetValue<bool>(),
            o["temperature"] is { } t ? (float)t.GetValue<double>() : null,
            o["top_k"]?.GetValue<int>(),
            o["top_p"] is { } p ? (float)p.GetValue<double>() : null,
            o["max_new_tokens"]?.GetValue<int>());
    }
}
