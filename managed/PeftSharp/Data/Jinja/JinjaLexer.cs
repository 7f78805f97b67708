using System.Globalization;
using System.Text;

namespace PeftSharp.Data.Jinja;

/// <summary>What a token inside a tag is.</summary>
internal enum TokenKind
{
    Name,
    String,
    Integer,
    Float,
    Operator,
    End,
}

/// <summary>One token of a tag's expression; <see cref="Line"/> is 1-based in the template.</summary>
internal readonly record struct Token(TokenKind Kind, string Text, int Line, object? Value = null)
{
    public bool Is(string op) => Kind == TokenKind.Operator && Text == op;

    public bool IsName(string name) => Kind == TokenKind.Name && Text == name;
}

/// <summary>A piece of the template: literal text, an output tag <c>{{ }}</c> or a statement tag <c>{% %}</c>.</summary>
internal sealed record Segment(SegmentKind Kind, string Text, List<Token> Tokens, int Line);

internal enum SegmentKind
{
    Text,
    Output,
    Statement,
}

/// <summary>
/// Splits a template into text and tags the way Jinja2's lexer does under the environment Hugging Face's
/// <c>apply_chat_template</c> uses (<c>trim_blocks=True, lstrip_blocks=True</c>, <c>keep_trailing_newline=False</c>):
/// <c>{%-</c>/<c>-%}</c> (and the same on <c>{{ }}</c> and <c>{# #}</c>) strip the whitespace on that side; a
/// statement or comment tag eats the one newline right after it; spaces and tabs from a line's start up to a
/// statement or comment tag go unless the tag opens with <c>{%+</c>; one trailing newline of the source goes;
/// <c>{% raw %}</c> ... <c>{% endraw %}</c> is text. Brackets inside a tag must balance before its end is seen.
/// </summary>
internal static class JinjaLexer
{
    private static readonly string[] Operators =
    {
        "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|",
    };

    private sealed class Piece
    {
        public SegmentKind Kind;
        public bool Comment;
        public string Text = "";
        public List<Token> Tokens = new();
        public int Line;
        public bool StripBefore;
        public bool KeepIndent;
        public bool StripAfter;
    }

    public static List<Segment> Split(string source, string origin)
    {
        source = source.Replace("\r\n", "\n").Replace('\r', '\n');
        if (source.EndsWith('\n')) source = source[..^1];
        var pieces = new List<Piece>();
        int pos = 0, line = 1;
        while (pos < source.Length)
        {
            int open = NextOpen(source, pos);
            if (open < 0)
            {
                pieces.Add(new Piece { Kind = SegmentKind.Text, Text = source[pos..], Line = line });
                break;
            }

            if (open > pos) pieces.Add(new Piece { Kind = SegmentKind.Text, Text = source[pos..open], Line = line });
            line += Count(source, pos, open);
            char kind = source[open + 1];
            int at = open + 2;
            var piece = new Piece { Line = line };
            if (at < source.Length && source[at] == '-') { piece.StripBefore = true; at++; }
            else if (at < source.Length && source[at] == '+') { piece.KeepIndent = true; at++; }

            if (kind == '#')
            {
                int close = source.IndexOf("#}", at, StringComparison.Ordinal);
                if (close < 0) throw Error(origin, line, "a comment {# is never closed");
                piece.Comment = true;
                piece.Kind = SegmentKind.Statement;
                piece.StripAfter = close > at && source[close - 1] == '-';
                line += Count(source, open, close + 2);
                pos = close + 2;
                pieces.Add(piece);
                continue;
            }

            piece.Kind = kind == '{' ? SegmentKind.Output : SegmentKind.Statement;
            string closer = kind == '{' ? "}}" : "%}";
            (piece.Tokens, pos, piece.StripAfter) = Tokenize(source, at, closer, origin, ref line);
            pieces.Add(piece);
            if (piece.Kind == SegmentKind.Statement && piece.Tokens.Count == 2 && piece.Tokens[0].IsName("raw"))
            {
                // {% raw %}: text up to the next {% endraw %}.
                int end = FindEndRaw(source, pos, out int after, out bool stripBefore, out bool stripAfter);
                if (end < 0) throw Error(origin, line, "{% raw %} is never closed by {% endraw %}");
                pieces.RemoveAt(pieces.Count - 1);
                var rawOpen = new Piece { Kind = SegmentKind.Statement, Comment = true, Line = line, StripBefore = piece.StripBefore, KeepIndent = piece.KeepIndent, StripAfter = piece.StripAfter };
                pieces.Add(rawOpen);
                pieces.Add(new Piece { Kind = SegmentKind.Text, Text = source[pos..end], Line = line });
                line += Count(source, pos, after);
                pieces.Add(new Piece { Kind = SegmentKind.Statement, Comment = true, Line = line, StripBefore = stripBefore, StripAfter = stripAfter });
                pos = after;
            }
        }

        ApplyWhitespaceControl(pieces);
        var segments = new List<Segment>();
        foreach (var p in pieces)
        {
            if (p.Kind == SegmentKind.Text)
            {
                if (p.Text.Length > 0) segments.Add(new Segment(SegmentKind.Text, p.Text, new List<Token>(), p.Line));
            }
            else if (!p.Comment)
            {
                segments.Add(new Segment(p.Kind, "", p.Tokens, p.Line));
            }
        }

        return segments;
    }

    /// <summary>Jinja2's whitespace rules over the pieces, in its order: strip markers, trim_blocks, lstrip_blocks.</summary>
    private static void ApplyWhitespaceControl(List<Piece> pieces)
    {
        bool lineStart = true;
        for (int i = 0; i < pieces.Count; i++)
        {
            var p = pieces[i];
            if (p.Kind != SegmentKind.Text)
            {
                lineStart = false;
                continue;
            }

            var before = i > 0 ? pieces[i - 1] : null;
            var after = i + 1 < pieces.Count ? pieces[i + 1] : null;
            string text = p.Text;
            bool startsLine = i == 0 || lineStart;
            if (before != null)
            {
                if (before.StripAfter)
                {
                    text = text.TrimStart();
                }
                else if (before.Kind == SegmentKind.Statement && text.StartsWith('\n'))
                {
                    text = text[1..];
                    startsLine = true;
                }
            }

            if (after != null)
            {
                if (after.StripBefore)
                {
                    text = text.TrimEnd();
                }
                else if (after.Kind == SegmentKind.Statement && !after.KeepIndent)
                {
                    int lineAt = text.LastIndexOf('\n') + 1;
                    if ((lineAt > 0 || startsLine) && text.AsSpan(lineAt).IsWhiteSpace()) text = text[..lineAt];
                }
            }

            p.Text = text;
            lineStart = false;
        }
    }

    private static int NextOpen(string s, int from)
    {
        for (int i = s.IndexOf('{', from); i >= 0 && i + 1 < s.Length; i = s.IndexOf('{', i + 1))
        {
            char c = s[i + 1];
            if (c == '{' || c == '%' || c == '#') return i;
        }

        return -1;
    }

    private static int FindEndRaw(string s, int from, out int after, out bool stripBefore, out bool stripAfter)
    {
        for (int i = s.IndexOf("{%", from, StringComparison.Ordinal); i >= 0; i = s.IndexOf("{%", i + 2, StringComparison.Ordinal))
        {
            int j = i + 2;
            stripBefore = j < s.Length && s[j] == '-';
            if (j < s.Length && (s[j] == '-' || s[j] == '+')) j++;
            while (j < s.Length && char.IsWhiteSpace(s[j])) j++;
            if (string.CompareOrdinal(s, j, "endraw", 0, 6) != 0) continue;
            j += 6;
            while (j < s.Length && char.IsWhiteSpace(s[j])) j++;
            stripAfter = j < s.Length && s[j] == '-';
            if (stripAfter) j++;
            if (string.CompareOrdinal(s, j, "%}", 0, 2) != 0) continue;
            after = j + 2;
            return i;
        }

        after = -1;
        stripBefore = stripAfter = false;
        return -1;
    }

    /// <summary>The tokens of one tag up to its closer (<c>}}</c> or <c>%}</c>, optionally <c>-</c> first).</summary>
    private static (List<Token> Tokens, int Next, bool StripAfter) Tokenize(string s, int pos, string closer, string origin, ref int line)
    {
        var tokens = new List<Token>();
        int depth = 0;
        while (true)
        {
            while (pos < s.Length && char.IsWhiteSpace(s[pos]))
            {
                if (s[pos] == '\n') line++;
                pos++;
            }

            if (pos >= s.Length) throw Error(origin, line, $"a tag is never closed by {closer}");
            if (depth == 0)
            {
                if (string.CompareOrdinal(s, pos, closer, 0, 2) == 0)
                {
                    tokens.Add(new Token(TokenKind.End, closer, line));
                    return (tokens, pos + 2, false);
                }

                if (s[pos] == '-' && string.CompareOrdinal(s, pos + 1, closer, 0, 2) == 0)
                {
                    tokens.Add(new Token(TokenKind.End, closer, line));
                    return (tokens, pos + 3, true);
                }
            }

            char c = s[pos];
            if (c == '\'' || c == '"')
            {
                var (text, next) = ReadString(s, pos, origin, line);
                line += Count(s, pos, next);
                tokens.Add(new Token(TokenKind.String, text, line, text));
                pos = next;
            }
            else if (char.IsDigit(c))
            {
                int start = pos;
                while (pos < s.Length && (char.IsDigit(s[pos]) || s[pos] == '_')) pos++;
                bool isFloat = false;
                if (pos + 1 < s.Length && s[pos] == '.' && char.IsDigit(s[pos + 1]))
                {
                    isFloat = true;
                    pos++;
                    while (pos < s.Length && (char.IsDigit(s[pos]) || s[pos] == '_')) pos++;
                }

                if (pos < s.Length && (s[pos] == 'e' || s[pos] == 'E'))
                {
                    int e = pos + 1;
                    if (e < s.Length && (s[e] == '+' || s[e] == '-')) e++;
                    if (e < s.Length && char.IsDigit(s[e]))
                    {
                        isFloat = true;
                        pos = e;
                        while (pos < s.Length && char.IsDigit(s[pos])) pos++;
                    }
                }

                string digits = s[start..pos].Replace("_", "");
                tokens.Add(isFloat
                    ? new Token(TokenKind.Float, digits, line, double.Parse(digits, CultureInfo.InvariantCulture))
                    : new Token(TokenKind.Integer, digits, line, long.Parse(digits, CultureInfo.InvariantCulture)));
            }
            else if (char.IsLetter(c) || c == '_')
            {
                int start = pos;
                while (pos < s.Length && (char.IsLetterOrDigit(s[pos]) || s[pos] == '_')) pos++;
                tokens.Add(new Token(TokenKind.Name, s[start..pos], line));
            }
            else
            {
                string? op = Operators.FirstOrDefault(o => string.CompareOrdinal(s, pos, o, 0, o.Length) == 0);
                if (op == null) throw Error(origin, line, $"unexpected character '{c}'");
                if (op is "(" or "[" or "{") depth++;
                if (op is ")" or "]" or "}") depth = Math.Max(0, depth - 1);
                tokens.Add(new Token(TokenKind.Operator, op, line));
                pos += op.Length;
            }
        }
    }

    /// <summary>A Python-style string literal (Jinja reads the escapes \n \t \\ \' \" \uXXXX ...).</summary>
    private static (string Text, int Next) ReadString(string s, int pos, string origin, int line)
    {
        char quote = s[pos];
        var sb = new StringBuilder();
        int i = pos + 1;
        while (true)
        {
            if (i >= s.Length) throw Error(origin, line, "a string literal is never closed");
            char c = s[i];
            if (c == quote) return (sb.ToString(), i + 1);
            if (c != '\\' || i + 1 >= s.Length)
            {
                sb.Append(c);
                i++;
                continue;
            }

            char e = s[i + 1];
            i += 2;
            switch (e)
            {
                case 'n': sb.Append('\n'); break;
                case 't': sb.Append('\t'); break;
                case 'r': sb.Append('\r'); break;
                case '0': sb.Append('\0'); break;
                case 'b': sb.Append('\b'); break;
                case 'f': sb.Append('\f'); break;
                case 'v': sb.Append('\v'); break;
                case 'a': sb.Append('\a'); break;
                case '\\': sb.Append('\\'); break;
                case '\'': sb.Append('\''); break;
                case '"': sb.Append('"'); break;
                case '\n': break;
                case 'x' when i + 2 <= s.Length:
                    sb.Append((char)Convert.ToInt32(s.Substring(i, 2), 16));
                    i += 2;
                    break;
                case 'u' when i + 4 <= s.Length:
                    sb.Append((char)Convert.ToInt32(s.Substring(i, 4), 16));
                    i += 4;
                    break;
                case 'U' when i + 8 <= s.Length:
                    sb.Append(char.ConvertFromUtf32(Convert.ToInt32(s.Substring(i, 8), 16)));
                    i += 8;
                    break;
                default:
                    sb.Append('\\').Append(e);
                    break;
            }
        }
    }

    private static int Count(string s, int from, int to)
    {
        int n = 0;
        for (int i = from; i < to && i < s.Length; i++)
        {
            if (s[i] == '\n') n++;
        }

        return n;
    }

    internal static PeftSharpInputException Error(string origin, int line, string message) =>
        new($"{origin}: chat template line {line}: {message}");
}
