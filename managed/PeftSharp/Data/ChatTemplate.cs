using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Data.Jinja;
using PeftSharp.Formats;

namespace PeftSharp.Data;

/// <summary>
/// A model's chat template, rendered as Hugging Face's <c>apply_chat_template(..., tokenize=False)</c> renders it:
/// Jinja2 in a sandbox with <c>trim_blocks</c> and <c>lstrip_blocks</c>, the variables <c>messages</c>,
/// <c>add_generation_prompt</c>, <c>tools</c> and <c>documents</c> (none unless given), the tokenizer's
/// <c>bos_token</c>, <c>eos_token</c>, <c>unk_token</c>, <c>pad_token</c>, any extra variables
/// (<c>chat_template_kwargs</c>), and HF's <c>raise_exception</c>, <c>strftime_now</c> and <c>tojson</c>.
/// <para>
/// No Jinja implementation for .NET is served here, so this is PeftSharp's own interpreter of the part of Jinja that
/// shipped chat templates use (Llama 3 / 3.1 / 3.2, Qwen2 / 2.5 / 3, Mistral, Gemma, Phi, SmolLM and alike; checked
/// against Jinja2 on those templates): text with whitespace control, output, if / elif / else, for (tuple targets,
/// <c>if</c> filters, else, <c>loop.*</c>, break / continue), set (including <c>namespace</c> attributes and blocks),
/// macros, comments, raw, Python's operators and str / dict methods, and the filters and tests listed in
/// <see cref="JinjaInterpreter"/>'s builtins. A template using anything else (include, import, extends, call blocks,
/// filter blocks, recursive loops, an unknown filter or test) is refused, at parse time or when that construct runs,
/// with the template's file and line; it is never rendered some other way.
/// </para>
/// </summary>
public sealed class ChatTemplate
{
    /// <summary>Where transformers 4.47+ and 5 save a tokenizer's template (read before tokenizer_config.json's).</summary>
    public const string JinjaFile = "chat_template.jinja";

    private readonly List<Node> nodes;

    private ChatTemplate(string source, string origin, List<Node> nodes, IReadOnlyDictionary<string, string> specialTokens)
    {
        Source = source;
        Origin = origin;
        this.nodes = nodes;
        SpecialTokens = specialTokens;
    }

    /// <summary>The template text.</summary>
    public string Source { get; }

    /// <summary>Where it came from (a file, or the key in it), for messages.</summary>
    public string Origin { get; }

    /// <summary>bos_token, eos_token, unk_token, pad_token as the tokenizer names them (those it has).</summary>
    public IReadOnlyDictionary<string, string> SpecialTokens { get; }

    /// <summary>Parses <paramref name="source"/>; a syntax error or an unsupported statement names <paramref name="origin"/> and the line.</summary>
    public static ChatTemplate Parse(string source, string origin, IReadOnlyDictionary<string, string>? specialTokens = null) =>
        new(source, origin, JinjaParser.Parse(source, origin), specialTokens ?? new Dictionary<string, string>());

    /// <summary>
    /// A model folder's chat template: chat_template.jinja, else tokenizer_config.json's <c>chat_template</c> (a string,
    /// or a list of named templates of which "default" is taken), else chat_template.json; null when it has none.
    /// Special tokens come from tokenizer_config.json.
    /// </summary>
    public static ChatTemplate? ForFolder(string folder)
    {
        string configPath = Path.Combine(folder, HfTokenizer.ConfigFile);
        var config = HfTokenizer.ReadJson(configPath);
        var special = SpecialTokensIn(config);
        string jinjaPath = Path.Combine(folder, JinjaFile);
        if (File.Exists(jinjaPath)) return Parse(File.ReadAllText(jinjaPath), jinjaPath, special);
        if (config?["chat_template"] is { } node) return Parse(TemplateText(node, configPath), configPath + " (chat_template)", special);
        string jsonPath = Path.Combine(folder, "chat_template.json");
        if (HfTokenizer.ReadJson(jsonPath)?["chat_template"] is { } j) return Parse(TemplateText(j, jsonPath), jsonPath + " (chat_template)", special);
        return null;
    }

    /// <summary>bos_token, eos_token, unk_token and pad_token of a folder's tokenizer_config.json (those it names).</summary>
    public static IReadOnlyDictionary<string, string> SpecialTokensOf(string folder) =>
        SpecialTokensIn(HfTokenizer.ReadJson(Path.Combine(folder, HfTokenizer.ConfigFile)));

    private static Dictionary<string, string> SpecialTokensIn(JsonObject? config)
    {
        var special = new Dictionary<string, string>();
        foreach (var key in new[] { "bos_token", "eos_token", "unk_token", "pad_token" })
        {
            if (HfTokenizer.TokenText(config?[key]) is { } text) special[key] = text;
        }

        return special;
    }

    /// <summary>
    /// The prompt text for <paramref name="messages"/> (OpenAI / HF messages: objects with role and content);
    /// <paramref name="addGenerationPrompt"/> opens the assistant's turn. A template that calls
    /// <c>raise_exception</c> (roles out of order, an unsupported role) or fails is a
    /// <see cref="PeftSharpInputException"/> naming the template's origin and line.
    /// </summary>
    public string Render(JsonArray messages, bool addGenerationPrompt = true, JsonArray? tools = null, JsonObject? variables = null)
    {
        var context = new Dictionary<string, object?>
        {
            ["messages"] = JinjaValues.FromJson(messages),
            ["add_generation_prompt"] = addGenerationPrompt,
            ["tools"] = tools == null ? null : JinjaValues.FromJson(tools),
            ["documents"] = null,
        };
        foreach (var (k, v) in SpecialTokens) context[k] = v;
        if (variables != null)
        {
            foreach (var (k, v) in variables) context[k] = JinjaValues.FromJson(v);
        }

        try
        {
            return JinjaInterpreter.Render(nodes, context);
        }
        catch (JinjaError e) when (e.Raised)
        {
            throw new PeftSharpInputException($"{Origin}: the chat template refused the messages (line {e.Line}): {e.Message}", e);
        }
        catch (JinjaError e)
        {
            throw new PeftSharpInputException($"{Origin}: chat template line {e.Line}: {e.Message}", e);
        }
    }

    private static string TemplateText(JsonNode node, string path) => node switch
    {
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
        JsonArray a => a.OfType<JsonObject>().FirstOrDefault(t => t["name"]?.GetValueKind() == JsonValueKind.String && t["name"]!.GetValue<string>() == "default")?["template"]
            is JsonValue t && t.GetValueKind() == JsonValueKind.String
            ? t.GetValue<string>()
            : throw new PeftSharpInputException($"{path}: chat_template is a list of named templates without one named \"default\""),
        _ => throw new PeftSharpInputException($"{path}: chat_template must be a string or a list of {{name, template}}"),
    };
}
