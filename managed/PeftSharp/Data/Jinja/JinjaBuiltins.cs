using System.Globalization;
using System.Text;
using static PeftSharp.Data.Jinja.JinjaValues;

namespace PeftSharp.Data.Jinja;

/// <summary>
/// The globals, filters, tests and Python methods chat templates use. Globals: <c>range</c>, <c>dict</c>,
/// <c>namespace</c>, and Hugging Face's <c>raise_exception</c> and <c>strftime_now</c>. Filters: abs, attr, capitalize,
/// count, d/default, dictsort, e/escape, first, float, indent, int, items, join, last, length, list, lower, map, max,
/// min, reject, rejectattr, replace, reverse, round, safe, select, selectattr, sort, string, sum, title, tojson (Hugging
/// Face's: json.dumps with ensure_ascii=False, keys unsorted), trim, unique, upper, wordcount. Tests: boolean,
/// callable, defined, divisibleby, eq/equalto/==, even, false, float, ge/&gt;=, gt/greaterthan/&gt;, in, integer,
/// iterable, le/&lt;=, lower, lt/lessthan/&lt;, mapping, ne/!=, none, number, odd, sameas, sequence, string, true,
/// undefined, upper. Methods: str's strip, lstrip, rstrip, split, rsplit, splitlines, startswith, endswith, upper,
/// lower, title, capitalize, replace, find, rfind, count, join, isdigit, isalpha, isspace, isupper, islower; dict's
/// items, keys, values, get. Any other name is undefined (calling it fails with its name).
/// </summary>
internal sealed partial class JinjaInterpreter
{
    private static readonly HashSet<string> Mutators = new()
    {
        "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update", "setdefault", "popitem", "add", "discard",
    };

    private static IEnumerable<(string, Callable)> Globals()
    {
        yield return ("range", new Callable("range", (a, _) =>
        {
            long start = 0, stop, step = 1;
            if (a.Count == 1) stop = ToLong(a[0]);
            else if (a.Count is 2 or 3)
            {
                start = ToLong(a[0]);
                stop = ToLong(a[1]);
                if (a.Count == 3) step = ToLong(a[2]);
            }
            else throw new JinjaError("range takes 1 to 3 arguments");
            if (step == 0) throw new JinjaError("range() arg 3 must not be zero");
            var list = new List<object?>();
            for (long i = start; step > 0 ? i < stop : i > stop; i += step)
            {
                if (list.Count > 1_000_000) throw new JinjaError("range too big");
                list.Add(i);
            }

            return list;
        }));
        yield return ("dict", new Callable("dict", (a, kw) =>
        {
            var d = a.Count == 1 && a[0] is OrderedDictionary<string, object?> src ? new OrderedDictionary<string, object?>(src) : new OrderedDictionary<string, object?>();
            foreach (var (k, v) in kw) d[k] = v;
            return d;
        }));
        yield return ("namespace", new Callable("namespace", (a, kw) =>
        {
            var ns = new Namespace();
            if (a.Count == 1 && a[0] is OrderedDictionary<string, object?> src)
            {
                foreach (var (k, v) in src) ns.Values[k] = v;
            }

            foreach (var (k, v) in kw) ns.Values[k] = v;
            return ns;
        }));
        yield return ("raise_exception", new Callable("raise_exception", (a, _) => throw new JinjaError(a.Count > 0 ? Str(a[0]) : "raise_exception", raised: true)));
        yield return ("strftime_now", new Callable("strftime_now", (a, _) => StrFTime(DateTime.Now, a.Count > 0 ? Str(a[0]) : "")));
    }

    /// <summary>Python's strftime for the directives templates use (%d %b %B %Y %m %y %H %M %S %I %p %a %A %j %%).</summary>
    internal static string StrFTime(DateTime t, string format)
    {
        var inv = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        for (int i = 0; i < format.Length; i++)
        {
            if (format[i] != '%' || i + 1 >= format.Length)
            {
                sb.Append(format[i]);
                continue;
            }

            char c = format[++i];
            sb.Append(c switch
            {
                'd' => t.ToString("dd", inv),
                'b' => t.ToString("MMM", inv),
                'B' => t.ToString("MMMM", inv),
                'Y' => t.ToString("yyyy", inv),
                'y' => t.ToString("yy", inv),
                'm' => t.ToString("MM", inv),
                'H' => t.ToString("HH", inv),
                'I' => t.ToString("hh", inv),
                'M' => t.ToString("mm", inv),
                'S' => t.ToString("ss", inv),
                'p' => t.ToString("tt", inv),
                'a' => t.ToString("ddd", inv),
                'A' => t.ToString("dddd", inv),
                'j' => t.DayOfYear.ToString("000", inv),
                '%' => "%",
                _ => throw new JinjaError($"strftime_now: the directive %{c} is not supported"),
            });
        }

        return sb.ToString();
    }

    /// <summary>A bound method of a str, list or dict, or null when the name is none.</summary>
    private static Callable? Method(object? target, string name)
    {
        if ((target is IList<object?> || target is OrderedDictionary<string, object?>) && Mutators.Contains(name))
        {
            return new Callable(name, (_, _) => throw new JinjaError($"access to attribute '{name}' of '{TypeName(target)}' object is unsafe (templates cannot change data)"));
        }

        if (target is OrderedDictionary<string, object?> d)
        {
            return name switch
            {
                "items" => new Callable(name, (_, _) => d.Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList()),
                "keys" => new Callable(name, (_, _) => d.Keys.Cast<object?>().ToList()),
                "values" => new Callable(name, (_, _) => d.Values.ToList()),
                "get" => new Callable(name, (a, _) => a.Count > 0 && a[0] is string k && d.TryGetValue(k, out var v) ? v : a.Count > 1 ? a[1] : null),
                _ => null,
            };
        }

        if (target is not string s) return null;
        string? Chars(List<object?> a) => a.Count > 0 && a[0] is string c ? c : null;
        return name switch
        {
            "strip" => new Callable(name, (a, _) => Chars(a) is { } c ? s.Trim(c.ToCharArray()) : s.Trim()),
            "lstrip" => new Callable(name, (a, _) => Chars(a) is { } c ? s.TrimStart(c.ToCharArray()) : s.TrimStart()),
            "rstrip" => new Callable(name, (a, _) => Chars(a) is { } c ? s.TrimEnd(c.ToCharArray()) : s.TrimEnd()),
            "split" => new Callable(name, (a, kw) => Split(s, Arg(a, kw, 0, "sep"), Arg(a, kw, 1, "maxsplit") is { } m ? ToLong(m) : -1, fromRight: false)),
            "rsplit" => new Callable(name, (a, kw) => Split(s, Arg(a, kw, 0, "sep"), Arg(a, kw, 1, "maxsplit") is { } m ? ToLong(m) : -1, fromRight: true)),
            "splitlines" => new Callable(name, (_, _) => s.Split('\n').Select(x => (object?)x.TrimEnd('\r')).Take(s.EndsWith('\n') ? s.Split('\n').Length - 1 : int.MaxValue).ToList()),
            "startswith" => new Callable(name, (a, _) => Affixes(a, name).Any(p => s.StartsWith(p, StringComparison.Ordinal))),
            "endswith" => new Callable(name, (a, _) => Affixes(a, name).Any(p => s.EndsWith(p, StringComparison.Ordinal))),
            "upper" => new Callable(name, (_, _) => s.ToUpperInvariant()),
            "lower" => new Callable(name, (_, _) => s.ToLowerInvariant()),
            "title" => new Callable(name, (_, _) => Title(s)),
            "capitalize" => new Callable(name, (_, _) => Capitalize(s)),
            "replace" => new Callable(name, (a, _) => Replace(s, Str(a[0]), Str(a[1]), a.Count > 2 ? ToLong(a[2]) : -1)),
            "find" => new Callable(name, (a, _) => (long)s.IndexOf(Str(a[0]), StringComparison.Ordinal)),
            "rfind" => new Callable(name, (a, _) => (long)s.LastIndexOf(Str(a[0]), StringComparison.Ordinal)),
            "count" => new Callable(name, (a, _) => (long)CountOf(s, Str(a[0]))),
            "join" => new Callable(name, (a, _) => string.Join(s, Iterate(a[0], "join")
                .Select(x => x is string xs ? xs : throw new JinjaError($"sequence item: expected str instance, {TypeName(x)} found")))),
            "isdigit" => new Callable(name, (_, _) => s.Length > 0 && s.All(char.IsDigit)),
            "isalpha" => new Callable(name, (_, _) => s.Length > 0 && s.All(char.IsLetter)),
            "isspace" => new Callable(name, (_, _) => s.Length > 0 && s.All(char.IsWhiteSpace)),
            "isupper" => new Callable(name, (_, _) => s.Any(char.IsLetter) && !s.Any(char.IsLower)),
            "islower" => new Callable(name, (_, _) => s.Any(char.IsLetter) && !s.Any(char.IsUpper)),
            _ => null,
        };
    }

    private static object? Arg(List<object?> a, Dictionary<string, object?> kw, int index, string name) =>
        index < a.Count ? a[index] : kw.TryGetValue(name, out var v) ? v : null;

    private static IEnumerable<string> Affixes(List<object?> a, string name) => a.Count == 0 ? throw new JinjaError($"{name} takes an argument") : a[0] switch
    {
        string p => new[] { p },
        object?[] t => t.Select(Str),
        var other => throw new JinjaError($"{name} first arg must be str or a tuple of str, not {TypeName(other)}"),
    };

    /// <summary>Python's str.split / rsplit: runs of whitespace when <paramref name="sep"/> is none, else exactly.</summary>
    private static List<object?> Split(string s, object? sep, long maxSplit, bool fromRight)
    {
        var parts = new List<string>();
        if (sep == null)
        {
            var words = s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).ToList();
            if (maxSplit < 0 || words.Count <= maxSplit + 1) return words.Cast<object?>().ToList();
            if (!fromRight)
            {
                string rest = s.TrimStart();
                for (int i = 0; i < maxSplit; i++)
                {
                    int end = rest.IndexOfAny(new[] { ' ', '\t', '\n', '\r', '\f', '\v' });
                    parts.Add(rest[..end]);
                    rest = rest[end..].TrimStart();
                }

                parts.Add(rest);
                return parts.Cast<object?>().ToList();
            }

            throw new JinjaError("rsplit with maxsplit and no separator is not supported");
        }

        string separator = Str(sep);
        if (separator.Length == 0) throw new JinjaError("empty separator");
        var all = s.Split(separator);
        if (maxSplit < 0 || all.Length <= maxSplit + 1) return all.Cast<object?>().ToList();
        int m = (int)maxSplit;
        if (!fromRight)
        {
            parts.AddRange(all.Take(m));
            parts.Add(string.Join(separator, all.Skip(m)));
        }
        else
        {
            parts.Add(string.Join(separator, all.Take(all.Length - m)));
            parts.AddRange(all.Skip(all.Length - m));
        }

        return parts.Cast<object?>().ToList();
    }

    private static string Replace(string s, string old, string with, long count)
    {
        if (count < 0) return old.Length == 0 ? string.Join(with, s.Select(c => c.ToString()).Prepend("").Append("")) : s.Replace(old, with, StringComparison.Ordinal);
        var sb = new StringBuilder();
        int at = 0;
        for (long n = 0; n < count; n++)
        {
            int i = s.IndexOf(old, at, StringComparison.Ordinal);
            if (i < 0 || old.Length == 0) break;
            sb.Append(s, at, i - at).Append(with);
            at = i + old.Length;
        }

        return sb.Append(s, at, s.Length - at).ToString();
    }

    private static int CountOf(string s, string sub)
    {
        if (sub.Length == 0) return s.Length + 1;
        int n = 0;
        for (int i = s.IndexOf(sub, StringComparison.Ordinal); i >= 0; i = s.IndexOf(sub, i + sub.Length, StringComparison.Ordinal)) n++;
        return n;
    }

    private static string Title(string s)
    {
        var sb = new StringBuilder(s.Length);
        bool previousCased = false;
        foreach (char c in s)
        {
            sb.Append(previousCased ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c));
            previousCased = char.IsLetter(c);
        }

        return sb.ToString();
    }

    private static string Capitalize(string s) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant();

    private object? Filter(string name, object? v, List<object?> a, Dictionary<string, object?> kw)
    {
        object? A(int i, string key, object? fallback = null) => i < a.Count ? a[i] : kw.TryGetValue(key, out var x) ? x : fallback;
        switch (name)
        {
            case "abs": return IsInteger(v) ? (object)Math.Abs(ToLong(v)) : Math.Abs(ToDouble(v));
            case "attr": return GetAttr(v, Str(A(0, "name")));
            case "capitalize": return Capitalize(Str(v));
            case "count":
            case "length":
                return v switch
                {
                    string s => (long)s.Length,
                    IList<object?> l => (long)l.Count,
                    OrderedDictionary<string, object?> d => (long)d.Count,
                    Namespace ns => (long)ns.Values.Count,
                    Undefined => 0L,
                    _ => throw new JinjaError($"object of type '{TypeName(v)}' has no len()"),
                };
            case "d":
            case "default":
                return v is Undefined || (Truthy(A(1, "boolean", false)) && !Truthy(v)) ? A(0, "default_value", "") : v;
            case "dictsort":
            {
                if (v is not OrderedDictionary<string, object?> d) throw new JinjaError("dictsort needs a dict");
                bool byValue = Str(A(1, "by", "key")) == "value";
                bool caseSensitive = Truthy(A(0, "case_sensitive", false));
                var pairs = d.Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList();
                pairs.Sort((x, y) => SortKey(((object?[])x!)[byValue ? 1 : 0], caseSensitive, y: ((object?[])y!)[byValue ? 1 : 0]));
                if (Truthy(A(2, "reverse", false))) pairs.Reverse();
                return pairs;
            }

            case "e":
            case "escape":
                return Str(v).Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;").Replace("\"", "&#34;").Replace("'", "&#39;");
            case "first":
            {
                var items = Iterate(v, "first");
                return items.Count > 0 ? items[0] : new Undefined("first of an empty sequence");
            }

            case "last":
            {
                var items = Iterate(v, "last");
                return items.Count > 0 ? items[^1] : new Undefined("last of an empty sequence");
            }

            case "float":
                return v switch
                {
                    long or double or bool => ToDouble(v),
                    string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double p) => p,
                    _ => A(0, "default", 0.0),
                };
            case "int":
                return v switch
                {
                    long or bool => ToLong(v),
                    double dv => (long)Math.Truncate(dv),
                    string s when long.TryParse(s.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out long p) => p,
                    string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double p) => (long)Math.Truncate(p),
                    _ => A(0, "default", 0L),
                };
            case "indent":
            {
                int width = (int)ToLong(A(0, "width", 4L));
                bool first = Truthy(A(1, "first", false)), blank = Truthy(A(2, "blank", false));
                string pad = new(' ', width);
                var lines = Str(v).Split('\n');
                for (int i = 0; i < lines.Length; i++)
                {
                    if ((i > 0 || first) && (blank || lines[i].Trim().Length > 0)) lines[i] = pad + lines[i];
                }

                return string.Join("\n", lines);
            }

            case "items":
                return v is Undefined ? new List<object?>() : v is OrderedDictionary<string, object?> dd
                    ? dd.Select(kv => (object?)new object?[] { kv.Key, kv.Value }).ToList()
                    : throw new JinjaError("items needs a dict");
            case "join":
            {
                string sep = Str(A(0, "d", ""));
                var items = Iterate(v, "join");
                if (A(1, "attribute") is { } attr) items = items.Select(x => GetAttrPath(x, attr)).ToList();
                return string.Join(sep, items.Select(Str));
            }

            case "list": return Iterate(v, "list").ToList();
            case "lower": return Str(v).ToLowerInvariant();
            case "upper": return Str(v).ToUpperInvariant();
            case "map":
            {
                var items = Iterate(v, "map");
                if (kw.TryGetValue("attribute", out var attr))
                {
                    return items.Select(x =>
                    {
                        var got = GetAttrPath(x, attr);
                        return got is Undefined && kw.TryGetValue("default", out var dflt) ? dflt : got;
                    }).ToList();
                }

                if (a.Count == 0) throw new JinjaError("map needs a filter name or attribute=");
                string filter = Str(a[0]);
                var rest = a.Skip(1).ToList();
                return items.Select(x => Filter(filter, x, rest, new Dictionary<string, object?>())).ToList();
            }

            case "max":
            case "min":
            {
                var items = Iterate(v, name).ToList();
                if (A(1, "attribute") is { } attr) items = items.Select(x => GetAttrPath(x, attr)).ToList();
                if (items.Count == 0) return new Undefined($"{name} of an empty sequence");
                bool caseSensitive = Truthy(A(0, "case_sensitive", false));
                var best = items[0];
                foreach (var x in items.Skip(1))
                {
                    int c = SortKey(x, caseSensitive, y: best);
                    if (name == "max" ? c > 0 : c < 0) best = x;
                }

                return best;
            }

            case "reject":
            case "select":
            {
                bool keep = name == "select";
                var items = Iterate(v, name);
                if (a.Count == 0) return items.Where(x => Truthy(x) == keep).ToList();
                string test = Str(a[0]);
                var rest = a.Skip(1).ToList();
                return items.Where(x => Test(test, x, rest) == keep).ToList();
            }

            case "rejectattr":
            case "selectattr":
            {
                bool keep = name == "selectattr";
                if (a.Count == 0) throw new JinjaError($"{name} needs an attribute name");
                var items = Iterate(v, name);
                object? attr = a[0];
                if (a.Count == 1) return items.Where(x => Truthy(GetAttrPath(x, attr)) == keep).ToList();
                string test = Str(a[1]);
                var rest = a.Skip(2).ToList();
                return items.Where(x => Test(test, GetAttrPath(x, attr), rest) == keep).ToList();
            }

            case "replace":
                return Replace(Str(v), Str(A(0, "old")), Str(A(1, "new")), A(2, "count") is { } cnt ? ToLong(cnt) : -1);
            case "reverse":
                return v switch
                {
                    string s => new string(s.Reverse().ToArray()),
                    _ => Iterate(v, "reverse").Reverse().ToList(),
                };
            case "round":
            {
                int precision = (int)ToLong(A(0, "precision", 0L));
                string method = Str(A(1, "method", "common"));
                double x = ToDouble(v), scale = Math.Pow(10, precision);
                return method switch
                {
                    "common" => Math.Round(x, Math.Clamp(precision, 0, 15), MidpointRounding.ToEven),
                    "ceil" => Math.Ceiling(x * scale) / scale,
                    "floor" => Math.Floor(x * scale) / scale,
                    _ => throw new JinjaError("round: method must be common, ceil or floor"),
                };
            }

            case "safe": return v;
            case "sort":
            {
                var items = Iterate(v, "sort").ToList();
                bool caseSensitive = Truthy(A(1, "case_sensitive", false));
                var attr = A(2, "attribute");
                var keyed = items.Select(x => (Key: attr == null ? x : GetAttrPath(x, attr), Item: x)).ToList();
                var sorted = keyed.OrderBy(p => p.Key, Comparer<object?>.Create((x, y) => SortKey(x, caseSensitive, y))).Select(p => p.Item).ToList();
                if (Truthy(A(0, "reverse", false))) sorted.Reverse();
                return sorted;
            }

            case "string": return Str(v);
            case "sum":
            {
                var items = Iterate(v, "sum");
                if (A(0, "attribute") is { } attr) items = items.Select(x => GetAttrPath(x, attr)).ToList();
                return items.Aggregate(A(1, "start", 0L), (acc, x) => Binary("+", acc, x));
            }

            case "title": return Title(Str(v));
            case "tojson":
            {
                int? indent = A(0, "indent") is { } ind ? (int)ToLong(ind) : null;
                (string, string)? separators = null;
                if (kw.TryGetValue("separators", out var sepv) && sepv is IList<object?> sl && sl.Count == 2) separators = (Str(sl[0]), Str(sl[1]));
                if (kw.TryGetValue("ensure_ascii", out var ea) && Truthy(ea)) throw new JinjaError("tojson(ensure_ascii=true) is not supported");
                return ToJson(v, indent, Truthy(kw.GetValueOrDefault("sort_keys", false)), separators);
            }

            case "trim":
                return A(0, "chars") is string chars ? Str(v).Trim(chars.ToCharArray()) : Str(v).Trim();
            case "unique":
            {
                var seen = new List<object?>();
                foreach (var x in Iterate(v, "unique"))
                {
                    bool ignoreCase = !Truthy(A(0, "case_sensitive", false));
                    if (!seen.Any(s => x is string xs && s is string ss && ignoreCase ? string.Equals(xs, ss, StringComparison.OrdinalIgnoreCase) : Equal(s, x))) seen.Add(x);
                }

                return seen;
            }

            case "wordcount": return (long)Str(v).Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Length;
            default:
                throw new JinjaError($"no filter named '{name}' (PeftSharp renders a subset of Jinja; see ChatTemplate)");
        }
    }

    /// <summary>An attribute path as filters take it: "a.b" or an index.</summary>
    private static object? GetAttrPath(object? target, object? path)
    {
        if (path is not string p) return GetItem(target, path);
        foreach (var part in p.Split('.')) target = long.TryParse(part, out long i) ? GetItem(target, i) : GetItem(target, part);
        return target;
    }

    private static int SortKey(object? x, bool caseSensitive, object? y)
    {
        if (!caseSensitive && x is string xs && y is string ys) return string.CompareOrdinal(xs.ToLowerInvariant(), ys.ToLowerInvariant());
        return JinjaValues.Compare(x, y, "sort");
    }

    private static bool Test(string name, object? v, List<object?> a)
    {
        object? Arg0() => a.Count > 0 ? a[0] : throw new JinjaError($"the test '{name}' takes an argument");
        return name switch
        {
            "defined" => v is not Undefined,
            "undefined" => v is Undefined,
            "none" => v == null,
            "boolean" => v is bool,
            "true" => v is true,
            "false" => v is false,
            "integer" => v is long,
            "float" => v is double,
            "number" => v is long or double or bool,
            "string" => v is string,
            "mapping" => v is OrderedDictionary<string, object?>,
            "iterable" => v is string or IList<object?> or OrderedDictionary<string, object?> or Undefined,
            "sequence" => v is string or IList<object?> or OrderedDictionary<string, object?>,
            "callable" => v is Callable,
            "sameas" => SameAs(v, Arg0()),
            "eq" or "equalto" or "==" => Equal(v, Arg0()),
            "ne" or "!=" => !Equal(v, Arg0()),
            "lt" or "lessthan" or "<" => JinjaValues.Compare(v, Arg0(), "lt") < 0,
            "le" or "<=" => JinjaValues.Compare(v, Arg0(), "le") <= 0,
            "gt" or "greaterthan" or ">" => JinjaValues.Compare(v, Arg0(), "gt") > 0,
            "ge" or ">=" => JinjaValues.Compare(v, Arg0(), "ge") >= 0,
            "in" => Contains(Arg0(), v),
            "odd" => ToLong(v) % 2 != 0,
            "even" => ToLong(v) % 2 == 0,
            "divisibleby" => ToLong(v) % ToLong(Arg0()) == 0,
            "lower" => Str(v) == Str(v).ToLowerInvariant(),
            "upper" => Str(v) == Str(v).ToUpperInvariant(),
            "escaped" => false,
            _ => throw new JinjaError($"no test named '{name}' (PeftSharp renders a subset of Jinja; see ChatTemplate)"),
        };
    }

    private static bool SameAs(object? x, object? y) => (x, y) switch
    {
        (null, null) => true,
        (bool bx, bool by) => bx == by,
        (long lx, long ly) => lx == ly,
        (string sx, string sy) => sx == sy,
        _ => ReferenceEquals(x, y),
    };
}
