using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftSharp.Formats;

/// <summary>
/// The boundary of every reader: what a parser's body throws on a value of the wrong type, a missing key, an
/// overflowing number or invalid UTF-8 becomes one <see cref="PeftSharpInputException"/> naming the file.
/// </summary>
public static class InputGuard
{
    /// <summary>Runs <paramref name="parse"/>; a parse failure becomes a <see cref="PeftSharpInputException"/> that names <paramref name="source"/>.</summary>
    public static T Parse<T>(string source, Func<T> parse)
    {
        try
        {
            return parse();
        }
        catch (Exception e) when (IsParseFailure(e))
        {
            throw Wrap(source, e);
        }
    }

    /// <summary>Runs <paramref name="parse"/>; a parse failure becomes a <see cref="PeftSharpInputException"/> that names <paramref name="source"/>.</summary>
    public static void Parse(string source, Action parse) => Parse(source, () =>
    {
        parse();
        return 0;
    });

    /// <summary>
    /// The exceptions a parser's body throws on bad content (not on a bug in the caller): System.Text.Json's
    /// JsonException and InvalidOperationException (a value of another type), FormatException, OverflowException
    /// (a number too large for its field), KeyNotFoundException, DecoderFallbackException (invalid UTF-8), and
    /// InvalidDataException that is not yet ours.
    /// </summary>
    public static bool IsParseFailure(Exception e) => e is not PeftSharpInputException && (
        e is JsonException or InvalidOperationException or FormatException or OverflowException or KeyNotFoundException
            or InvalidCastException or DecoderFallbackException or InvalidDataException or IndexOutOfRangeException or ArgumentException)
        && e is not ObjectDisposedException and not ArgumentNullException;

    /// <summary>A parse failure as our exception, the file named once.</summary>
    public static PeftSharpInputException Wrap(string source, Exception e)
    {
        string message = e.Message.ReplaceLineEndings(" ");
        string detail = e switch
        {
            JsonException j when j.LineNumber is long line => $"not valid JSON at line {line + 1}, byte {j.BytePositionInLine + 1}: {message}",
            DecoderFallbackException => $"not valid UTF-8: {message}",
            OverflowException => $"a number is out of range: {message}",
            _ => message,
        };
        return new PeftSharpInputException(message.StartsWith(source, StringComparison.Ordinal) ? message : $"{source}: {detail}", e);
    }

    /// <summary>
    /// The JSON value as <typeparamref name="T"/>; a value of another kind (<c>"hidden_size": "64"</c>) is an error
    /// naming its JSON path and what it holds.
    /// </summary>
    public static T Value<T>(this JsonNode node)
    {
        if (node is JsonValue v && v.TryGetValue(out T? value) && value is not null) return value;
        if (typeof(T) == typeof(double) && node is JsonValue d && d.TryGetValue(out int i)) return (T)(object)(double)i;
        string held = node.GetValueKind() switch
        {
            JsonValueKind.String => $"the string {Clip(node.ToJsonString())}",
            JsonValueKind.Number => $"the number {Clip(node.ToJsonString())}",
            JsonValueKind.Object => "an object",
            JsonValueKind.Array => "an array",
            JsonValueKind.True or JsonValueKind.False => $"the boolean {node.ToJsonString()}",
            _ => node.ToJsonString(),
        };
        throw new PeftSharpJsonValueException($"{node.GetPath()} is {held}, expected {Expected(typeof(T))}");
    }

    private static string Clip(string s) => s.Length <= 40 ? s : s[..40] + "...";

    private static string Expected(Type t) =>
        t == typeof(int) || t == typeof(long) ? "an integer in range" :
        t == typeof(double) || t == typeof(float) ? "a number" :
        t == typeof(bool) ? "true or false" :
        t == typeof(string) ? "a string" : t.Name;
}

/// <summary>A JSON value of the wrong kind, before the reader's boundary adds the file's name.</summary>
internal sealed class PeftSharpJsonValueException(string message) : InvalidOperationException(message);
