using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftSharp.Data.Jinja;

/// <summary>
/// Jinja2's values in C#: none is null, then bool, long, double, string, <see cref="List{T}"/> (list),
/// <c>object?[]</c> (tuple), <see cref="OrderedDictionary{TKey, TValue}"/> with string keys (dict, insertion order
/// kept as Python's), <see cref="Undefined"/>, <see cref="Namespace"/>, <see cref="Callable"/> and <see cref="LoopInfo"/>.
/// Printing, truth, equality and order follow Python's <c>str</c>, <c>bool</c>, <c>==</c> and <c>&lt;</c>.
/// </summary>
internal static class JinjaValues
{
    /// <summary>A value of the JSON the request carried (messages, tools, chat_template_kwargs).</summary>
    public static object? FromJson(JsonNode? node) => node switch
    {
        null => null,
        JsonObject o => Dict(o.Select(kv => (kv.Key, FromJson(kv.Value)))),
        JsonArray a => a.Select(FromJson).ToList(),
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => v.GetValue<string>(),
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            JsonValueKind.Number => Number(v.ToJsonString()),
            _ => null,
        },
        _ => null,
    };

    /// <summary>A JSON number as Python's json.loads reads it: an int unless it has a fraction or an exponent.</summary>
    private static object Number(string text) =>
        text.IndexOfAny(new[] { '.', 'e', 'E' }) < 0 && long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out long l)
            ? (object)l
            : double.Parse(text, NumberStyles.Float, CultureInfo.InvariantCulture);

    public static OrderedDictionary<string, object?> Dict(IEnumerable<(string Key, object? Value)> items)
    {
        var d = new OrderedDictionary<string, object?>();
        foreach (var (k, v) in items) d[k] = v;
        return d;
    }

    public static bool Truthy(object? v) => v switch
    {
        null or Undefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        IList<object?> l => l.Count > 0,
        OrderedDictionary<string, object?> d => d.Count > 0,
        _ => true,
    };

    /// <summary>Python's <c>str(v)</c>, as <c>{{ v }}</c> prints it (an undefined value prints nothing).</summary>
    public static string Str(object? v) => v switch
    {
        string s => s,
        Undefined => "",
        _ => Repr(v),
    };

    /// <summary>Python's <c>repr(v)</c>, as a value inside a printed list or dict looks.</summary>
    public static string Repr(object? v)
    {
        switch (v)
        {
            case null: return "None";
            case Undefined: return "";
            case bool b: return b ? "True" : "False";
            case long l: return l.ToString(CultureInfo.InvariantCulture);
            case double d: return FloatRepr(d);
            case string s: return QuoteRepr(s);
            case object?[] t: return t.Length == 1 ? "(" + Repr(t[0]) + ",)" : "(" + string.Join(", ", t.Select(Repr)) + ")";
            case IList<object?> l: return "[" + string.Join(", ", l.Select(Repr)) + "]";
            case OrderedDictionary<string, object?> d: return "{" + string.Join(", ", d.Select(kv => QuoteRepr(kv.Key) + ": " + Repr(kv.Value))) + "}";
            case Namespace: return "<Namespace>";
            case Callable c: return $"<function {c.Name}>";
            default: return v.ToString() ?? "";
        }
    }

    /// <summary>Python's float repr: shortest round trip, ".0" on whole numbers, an exponent from 1e16 up and below 1e-4.</summary>
    public static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        if (d == 0) return double.IsNegative(d) ? "-0.0" : "0.0";
        string r = d.ToString("R", CultureInfo.InvariantCulture);
        string sign = r.StartsWith('-') ? "-" : "";
        r = r.TrimStart('-');
        int exponentAt = r.IndexOf('E');
        int exponent = exponentAt < 0 ? 0 : int.Parse(r[(exponentAt + 1)..], CultureInfo.InvariantCulture);
        string mantissa = exponentAt < 0 ? r : r[..exponentAt];
        int dot = mantissa.IndexOf('.');
        string digits = mantissa.Replace(".", "");
        int point = (dot < 0 ? mantissa.Length : dot) + exponent;
        int lead = digits.Length - digits.TrimStart('0').Length;
        digits = digits.Trim('0');
        point -= lead;
        int e = point - 1;
        if (e < -4 || e >= 16)
        {
            string m = digits.Length == 1 ? digits : digits[0] + "." + digits[1..];
            return sign + m + (e < 0 ? "e-" : "e+") + Math.Abs(e).ToString("00", CultureInfo.InvariantCulture);
        }

        if (point <= 0) return sign + "0." + new string('0', -point) + digits;
        if (point >= digits.Length) return sign + digits + new string('0', point - digits.Length) + ".0";
        return sign + digits[..point] + "." + digits[point..];
    }

    private static string QuoteRepr(string s)
    {
        char q = s.Contains('\'') && !s.Contains('"') ? '"' : '\'';
        var sb = new StringBuilder().Append(q);
        foreach (char c in s)
        {
            switch (c)
            {
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c == q) sb.Append('\\').Append(c);
                    else if (c < 0x20 || c == 0x7f) sb.Append("\\x").Append(((int)c).ToString("x2", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }

        return sb.Append(q).ToString();
    }

    /// <summary>Python's <c>==</c>: numbers by value across bool, int and float; sequences and dicts by contents.</summary>
    public static bool Equal(object? a, object? b)
    {
        if (a is Undefined || b is Undefined) return a is Undefined && b is Undefined;
        if (a == null || b == null) return a == null && b == null;
        if (IsNumber(a) && IsNumber(b)) return ToDouble(a) == ToDouble(b);
        if (a is string sa) return b is string sb && sa == sb;
        if (a is object?[] ta) return b is object?[] tb && ta.Length == tb.Length && ta.Zip(tb).All(p => Equal(p.First, p.Second));
        if (a is List<object?> la) return b is List<object?> lb && la.Count == lb.Count && la.Zip(lb).All(p => Equal(p.First, p.Second));
        if (a is OrderedDictionary<string, object?> da)
        {
            return b is OrderedDictionary<string, object?> db && da.Count == db.Count && da.All(kv => db.TryGetValue(kv.Key, out var o) && Equal(kv.Value, o));
        }

        return ReferenceEquals(a, b);
    }

    /// <summary>Python's ordering of two numbers, two strings (ordinal) or two sequences; anything else is an error.</summary>
    public static int Compare(object? a, object? b, string where)
    {
        if (IsNumber(a) && IsNumber(b)) return ToDouble(a).CompareTo(ToDouble(b));
        if (a is string sa && b is string sb) return string.CompareOrdinal(sa, sb);
        if (a is IList<object?> la && b is IList<object?> lb)
        {
            for (int i = 0; i < Math.Min(la.Count, lb.Count); i++)
            {
                if (!Equal(la[i], lb[i])) return Compare(la[i], lb[i], where);
            }

            return la.Count.CompareTo(lb.Count);
        }

        throw new JinjaError($"{where}: cannot order {TypeName(a)} and {TypeName(b)}");
    }

    public static bool IsNumber(object? v) => v is long or double or bool;

    public static bool IsInteger(object? v) => v is long or bool;

    public static double ToDouble(object? v) => v switch
    {
        long l => l,
        double d => d,
        bool b => b ? 1 : 0,
        _ => throw new JinjaError($"{TypeName(v)} is not a number"),
    };

    public static long ToLong(object? v) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        _ => throw new JinjaError($"{TypeName(v)} is not an integer"),
    };

    /// <summary>Python's type name, for errors.</summary>
    public static string TypeName(object? v) => v switch
    {
        null => "NoneType",
        Undefined u => $"undefined ('{u.Name}')",
        bool => "bool",
        long => "int",
        double => "float",
        string => "str",
        object?[] => "tuple",
        IList<object?> => "list",
        OrderedDictionary<string, object?> => "dict",
        Namespace => "Namespace",
        Callable => "function",
        LoopInfo => "LoopContext",
        _ => v.GetType().Name,
    };

    /// <summary>What <c>for</c> walks: a list's items, a dict's keys, a string's characters; an undefined value is empty.</summary>
    public static IReadOnlyList<object?> Iterate(object? v, string where) => v switch
    {
        Undefined => Array.Empty<object?>(),
        IList<object?> l => l.ToList(),
        OrderedDictionary<string, object?> d => d.Keys.Cast<object?>().ToList(),
        string s => s.Select(c => (object?)c.ToString()).ToList(),
        _ => throw new JinjaError($"{where}: {TypeName(v)} is not iterable"),
    };

    /// <summary>HF's <c>tojson</c>: Python's json.dumps with ensure_ascii=False, keys in order unless sorted.</summary>
    public static string ToJson(object? v, int? indent, bool sortKeys, (string Item, string Key)? separators = null)
    {
        var (item, key) = separators ?? (indent == null ? (", ", ": ") : (",", ": "));
        var sb = new StringBuilder();
        void Write(object? x, int level)
        {
            switch (x)
            {
                case null: sb.Append("null"); break;
                case bool b: sb.Append(b ? "true" : "false"); break;
                case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
                case double d:
                    sb.Append(double.IsNaN(d) ? "NaN" : double.IsInfinity(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatRepr(d));
                    break;
                case string s: JsonString(sb, s); break;
                case IList<object?> l:
                    Container('[', ']', l.Select(e => (string?)null).ToList(), l.ToList(), level);
                    break;
                case OrderedDictionary<string, object?> d:
                    var pairs = sortKeys ? d.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToList() : d.ToList();
                    Container('{', '}', pairs.Select(kv => (string?)kv.Key).ToList(), pairs.Select(kv => kv.Value).ToList(), level);
                    break;
                default: throw new JinjaError($"tojson: Object of type {TypeName(x)} is not JSON serializable");
            }
        }

        void Container(char open, char close, List<string?> keys, List<object?> values, int level)
        {
            sb.Append(open);
            if (values.Count == 0)
            {
                sb.Append(close);
                return;
            }

            for (int i = 0; i < values.Count; i++)
            {
                if (i > 0) sb.Append(item);
                if (indent != null) sb.Append('\n').Append(' ', indent.Value * (level + 1));
                if (keys[i] != null)
                {
                    JsonString(sb, keys[i]!);
                    sb.Append(key);
                }

                Write(values[i], level + 1);
            }

            if (indent != null) sb.Append('\n').Append(' ', indent.Value * level);
            sb.Append(close);
        }

        Write(v, 0);
        return sb.ToString();
    }

    private static void JsonString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }

        sb.Append('"');
    }
}

/// <summary>A name or key that is not there: prints nothing, is false, iterates as empty; most other uses fail.</summary>
internal sealed record Undefined(string Name);

/// <summary><c>namespace(...)</c>: the one object a template may assign attributes to (to carry state out of loops).</summary>
internal sealed class Namespace
{
    public Dictionary<string, object?> Values { get; } = new();
}

/// <summary>A global, macro or bound method: positional and keyword arguments in, a value out.</summary>
internal sealed record Callable(string Name, Func<List<object?>, Dictionary<string, object?>, object?> Invoke);

/// <summary>The <c>loop</c> variable of a for loop.</summary>
internal sealed class LoopInfo(IReadOnlyList<object?> items)
{
    public int Index0 { get; set; }

    public object? Get(string name) => name switch
    {
        "index0" => (long)Index0,
        "index" => (long)Index0 + 1,
        "revindex" => (long)(items.Count - Index0),
        "revindex0" => (long)(items.Count - Index0 - 1),
        "first" => Index0 == 0,
        "last" => Index0 == items.Count - 1,
        "length" => (long)items.Count,
        "depth" => 1L,
        "depth0" => 0L,
        "previtem" => Index0 > 0 ? items[Index0 - 1] : new Undefined("loop.previtem"),
        "nextitem" => Index0 + 1 < items.Count ? items[Index0 + 1] : new Undefined("loop.nextitem"),
        "cycle" => new Callable("loop.cycle", (a, _) => a.Count == 0 ? throw new JinjaError("loop.cycle needs arguments") : a[Index0 % a.Count]),
        _ => new Undefined("loop." + name),
    };
}

/// <summary>
/// A failure while rendering (a type error, an undefined value used); <see cref="Raised"/> when the template called
/// <c>raise_exception</c>; <see cref="Line"/> once the statement it happened in is known.
/// </summary>
internal sealed class JinjaError(string message, int? line = null, bool raised = false) : Exception(message)
{
    public int? Line { get; } = line;

    public bool Raised { get; } = raised;
}
