using System.Text;
using static PeftSharp.Data.Jinja.JinjaValues;

namespace PeftSharp.Data.Jinja;

/// <summary>
/// Renders parsed statements as Jinja2's sandboxed environment does: each for-loop iteration gets its own scope (a
/// <c>set</c> inside a loop never leaks out; <c>namespace()</c> carries state across), <c>if</c> opens no scope,
/// macros see the scope they were defined in. Data is immutable: list.append, dict.update and the like fail as the
/// sandbox makes them fail.
/// </summary>
internal sealed partial class JinjaInterpreter
{
    private enum Flow
    {
        Normal,
        Break,
        Continue,
    }

    private sealed class Scope(Scope? parent)
    {
        private Scope? Parent { get; } = parent;

        public Dictionary<string, object?> Vars { get; } = new();

        public object? Lookup(string name)
        {
            for (var s = this; s != null; s = s.Parent)
            {
                if (s.Vars.TryGetValue(name, out var v)) return v;
            }

            return new Undefined(name);
        }
    }

    public static string Render(List<Node> template, IReadOnlyDictionary<string, object?> context)
    {
        var globals = new Scope(null);
        foreach (var (name, fn) in Globals()) globals.Vars[name] = fn;
        var root = new Scope(globals);
        foreach (var (k, v) in context) root.Vars[k] = v;
        var sb = new StringBuilder();
        new JinjaInterpreter().Exec(template, root, sb);
        return sb.ToString();
    }

    private Flow Exec(List<Node> body, Scope scope, StringBuilder sb)
    {
        foreach (var node in body)
        {
            Flow flow;
            try
            {
                flow = ExecOne(node, scope, sb);
            }
            catch (JinjaError e) when (e.Line == null)
            {
                throw new JinjaError(e.Message, node.Line, e.Raised);
            }
            catch (Exception e) when (e is ArgumentException or IndexOutOfRangeException or InvalidCastException or OverflowException or FormatException)
            {
                // A builtin called with arguments it cannot take ('x'.replace(), 'a' * 10**12): the template's error, with its line.
                throw new JinjaError(e.Message, node.Line);
            }

            if (flow != Flow.Normal) return flow;
        }

        return Flow.Normal;
    }

    private Flow ExecOne(Node node, Scope scope, StringBuilder sb)
    {
        switch (node)
        {
            case TextNode t:
                sb.Append(t.Text);
                return Flow.Normal;
            case OutputNode o:
                sb.Append(Str(Eval(o.Value, scope)));
                return Flow.Normal;
            case IfNode i:
                foreach (var (test, branch) in i.Branches)
                {
                    if (Truthy(Eval(test, scope))) return Exec(branch, scope, sb);
                }

                return Exec(i.Else, scope, sb);
            case ForNode f:
                return ExecFor(f, scope, sb);
            case SetNode s:
            {
                var value = Eval(s.Value, scope);
                if (s.Namespace != null)
                {
                    if (scope.Lookup(s.Namespace) is not Namespace ns) throw new JinjaError($"cannot assign attribute on non-namespace object '{s.Namespace}'");
                    ns.Values[s.Targets[0]] = value;
                }
                else
                {
                    Assign(scope, s.Targets, value);
                }

                return Flow.Normal;
            }

            case SetBlockNode sb2:
            {
                var inner = new StringBuilder();
                Exec(sb2.Body, scope, inner);
                scope.Vars[sb2.Target] = inner.ToString();
                return Flow.Normal;
            }

            case MacroNode m:
                scope.Vars[m.Name] = Macro(m, scope);
                return Flow.Normal;
            case BreakNode:
                return Flow.Break;
            case ContinueNode:
                return Flow.Continue;
            case GenerationNode g:
                return Exec(g.Body, scope, sb);
            default:
                throw new JinjaError($"unknown node {node.GetType().Name}");
        }
    }

    private Flow ExecFor(ForNode f, Scope scope, StringBuilder sb)
    {
        var items = Iterate(Eval(f.Items, scope), "for");
        if (f.Filter != null)
        {
            items = items.Where(item =>
            {
                var probe = new Scope(scope);
                Assign(probe, f.Targets, item);
                return Truthy(Eval(f.Filter, probe));
            }).ToList();
        }

        if (items.Count == 0) return Exec(f.Else, scope, sb);
        var loop = new LoopInfo(items);
        for (int i = 0; i < items.Count; i++)
        {
            loop.Index0 = i;
            var inner = new Scope(scope);
            inner.Vars["loop"] = loop;
            Assign(inner, f.Targets, items[i]);
            if (Exec(f.Body, inner, sb) == Flow.Break) break;
        }

        return Flow.Normal;
    }

    private static void Assign(Scope scope, string[] targets, object? value)
    {
        if (targets.Length == 1)
        {
            scope.Vars[targets[0]] = value;
            return;
        }

        var parts = Iterate(value, "unpacking");
        if (parts.Count != targets.Length) throw new JinjaError($"cannot unpack {parts.Count} values into {targets.Length} names");
        for (int i = 0; i < targets.Length; i++) scope.Vars[targets[i]] = parts[i];
    }

    private Callable Macro(MacroNode m, Scope definedIn) => new(m.Name, (args, kwargs) =>
    {
        if (args.Count > m.Parameters.Length) throw new JinjaError($"macro '{m.Name}' takes {m.Parameters.Length} arguments, {args.Count} given");
        var inner = new Scope(definedIn);
        for (int i = 0; i < m.Parameters.Length; i++)
        {
            string p = m.Parameters[i];
            inner.Vars[p] = i < args.Count ? args[i]
                : kwargs.TryGetValue(p, out var kw) ? kw
                : m.Defaults[i] is { } d ? Eval(d, inner)
                : new Undefined(p);
        }

        foreach (var k in kwargs.Keys)
        {
            if (!m.Parameters.Contains(k)) throw new JinjaError($"macro '{m.Name}' has no parameter '{k}'");
        }

        var sb = new StringBuilder();
        Exec(m.Body, inner, sb);
        return sb.ToString();
    });

    private object? Eval(Expr e, Scope scope)
    {
        switch (e)
        {
            case LiteralExpr l:
                return l.Value;
            case NameExpr n:
                return scope.Lookup(n.Name);
            case ListExpr l:
            {
                var items = l.Items.Select(x => Eval(x, scope)).ToList();
                return l.Tuple ? items.ToArray() : items;
            }

            case DictExpr d:
            {
                var dict = new OrderedDictionary<string, object?>();
                foreach (var (k, v) in d.Items)
                {
                    if (Eval(k, scope) is not string key) throw new JinjaError("dict literals take string keys only");
                    dict[key] = Eval(v, scope);
                }

                return dict;
            }

            case AttrExpr a:
                return GetAttr(Eval(a.Target, scope), a.Name);
            case ItemExpr i:
                return GetItem(Eval(i.Target, scope), Eval(i.Key, scope));
            case SliceExpr s:
                return Slice(Eval(s.Target, scope), s.Start == null ? null : Eval(s.Start, scope), s.Stop == null ? null : Eval(s.Stop, scope),
                    s.Step == null ? null : Eval(s.Step, scope));
            case CallExpr c:
            {
                var target = Eval(c.Target, scope);
                var args = c.Args.Select(x => Eval(x, scope)).ToList();
                var kwargs = c.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, scope));
                return target switch
                {
                    Callable fn => fn.Invoke(args, kwargs),
                    Undefined u => throw new JinjaError($"'{u.Name}' is undefined"),
                    _ => throw new JinjaError($"'{TypeName(target)}' object is not callable"),
                };
            }

            case FilterExpr f:
                return Filter(f.Name, Eval(f.Target, scope), f.Args.Select(x => Eval(x, scope)).ToList(), f.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, scope)));
            case TestExpr t:
            {
                bool result = Test(t.Name, Eval(t.Target, scope), t.Args.Select(x => Eval(x, scope)).ToList());
                return result != t.Negated;
            }

            case BinaryExpr b:
                return Binary(b.Op, Eval(b.Left, scope), Eval(b.Right, scope));
            case NegateExpr n:
            {
                var v = Eval(n.Operand, scope);
                if (!IsNumber(v)) throw new JinjaError($"bad operand type for unary {(n.Minus ? "-" : "+")}: '{TypeName(v)}'");
                if (!n.Minus) return v is bool bv ? (bv ? 1L : 0L) : v;
                return IsInteger(v) ? (object)(-ToLong(v)) : -ToDouble(v);
            }

            case CompareExpr c:
            {
                var left = Eval(c.First, scope);
                foreach (var (op, rightExpr) in c.Rest)
                {
                    var right = Eval(rightExpr, scope);
                    if (!CompareOne(op, left, right)) return false;
                    left = right;
                }

                return true;
            }

            case AndExpr a:
            {
                var left = Eval(a.Left, scope);
                return Truthy(left) ? Eval(a.Right, scope) : left;
            }

            case OrExpr o:
            {
                var left = Eval(o.Left, scope);
                return Truthy(left) ? left : Eval(o.Right, scope);
            }

            case NotExpr n:
                return !Truthy(Eval(n.Operand, scope));
            case ConditionalExpr c:
                return Truthy(Eval(c.Test, scope)) ? Eval(c.Then, scope) : c.Else != null ? Eval(c.Else, scope) : new Undefined("the else branch of a conditional");
            default:
                throw new JinjaError($"unknown expression {e.GetType().Name}");
        }
    }

    private static bool CompareOne(string op, object? left, object? right) => op switch
    {
        "==" => Equal(left, right),
        "!=" => !Equal(left, right),
        "<" => JinjaValues.Compare(left, right, "<") < 0,
        ">" => JinjaValues.Compare(left, right, ">") > 0,
        "<=" => JinjaValues.Compare(left, right, "<=") <= 0,
        ">=" => JinjaValues.Compare(left, right, ">=") >= 0,
        "in" => Contains(right, left),
        "not in" => !Contains(right, left),
        _ => throw new JinjaError($"unknown comparison {op}"),
    };

    internal static bool Contains(object? container, object? item) => container switch
    {
        string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw new JinjaError($"'in <string>' requires string as left operand, not {TypeName(item)}"),
        IList<object?> l => l.Any(x => Equal(x, item)),
        OrderedDictionary<string, object?> d => item is string k && d.ContainsKey(k),
        Namespace ns => item is string k && ns.Values.ContainsKey(k),
        Undefined => false,
        _ => throw new JinjaError($"argument of type '{TypeName(container)}' is not iterable"),
    };

    private static object? Binary(string op, object? a, object? b)
    {
        if (op == "~") return Str(a) + Str(b);
        if (a is Undefined ua) throw new JinjaError($"'{ua.Name}' is undefined");
        if (b is Undefined ub) throw new JinjaError($"'{ub.Name}' is undefined");
        bool ints = IsInteger(a) && IsInteger(b);
        bool numbers = IsNumber(a) && IsNumber(b);
        switch (op)
        {
            case "+":
                if (numbers) return ints ? (object)(ToLong(a) + ToLong(b)) : ToDouble(a) + ToDouble(b);
                if (a is string sa && b is string sb) return sa + sb;
                if (a is object?[] ta && b is object?[] tb) return ta.Concat(tb).ToArray();
                if (a is List<object?> la && b is List<object?> lb) return la.Concat(lb).ToList();
                break;
            case "-":
                if (numbers) return ints ? (object)(ToLong(a) - ToLong(b)) : ToDouble(a) - ToDouble(b);
                break;
            case "*":
                if (numbers) return ints ? (object)(ToLong(a) * ToLong(b)) : ToDouble(a) * ToDouble(b);
                if (a is string rs && IsInteger(b)) return string.Concat(Enumerable.Repeat(rs, (int)Math.Max(0, ToLong(b))));
                if (a is List<object?> rl && IsInteger(b)) return Enumerable.Repeat(rl, (int)Math.Max(0, ToLong(b))).SelectMany(x => x).ToList();
                break;
            case "/":
                if (numbers)
                {
                    if (ToDouble(b) == 0) throw new JinjaError("division by zero");
                    return ToDouble(a) / ToDouble(b);
                }

                break;
            case "//":
                if (numbers)
                {
                    if (ToDouble(b) == 0) throw new JinjaError("integer division or modulo by zero");
                    return ints ? (object)FloorDiv(ToLong(a), ToLong(b)) : Math.Floor(ToDouble(a) / ToDouble(b));
                }

                break;
            case "%":
                if (numbers)
                {
                    if (ToDouble(b) == 0) throw new JinjaError("integer division or modulo by zero");
                    if (ints) return (object)(ToLong(a) - (FloorDiv(ToLong(a), ToLong(b)) * ToLong(b)));
                    double x = ToDouble(a), y = ToDouble(b);
                    return x - (Math.Floor(x / y) * y);
                }

                if (a is string) throw new JinjaError("string formatting with % is not supported");
                break;
            case "**":
                if (numbers)
                {
                    if (ints && ToLong(b) >= 0)
                    {
                        long result = 1, baseValue = ToLong(a);
                        for (long i = 0; i < ToLong(b); i++) result = checked(result * baseValue);
                        return result;
                    }

                    return Math.Pow(ToDouble(a), ToDouble(b));
                }

                break;
        }

        throw new JinjaError($"unsupported operand type(s) for {op}: '{TypeName(a)}' and '{TypeName(b)}'");
    }

    private static long FloorDiv(long a, long b)
    {
        long q = a / b;
        return (a % b != 0) && ((a < 0) != (b < 0)) ? q - 1 : q;
    }

    /// <summary>Jinja's getattr: an attribute (a method of str, list or dict) first, then an item.</summary>
    internal static object? GetAttr(object? target, string name)
    {
        switch (target)
        {
            case Undefined u:
                throw new JinjaError($"'{u.Name}' is undefined");
            case LoopInfo loop:
                return loop.Get(name);
            case Namespace ns:
                return ns.Values.TryGetValue(name, out var nv) ? nv : new Undefined($"namespace has no attribute '{name}'");
        }

        if (Method(target, name) is { } method) return method;
        if (target is OrderedDictionary<string, object?> d && d.TryGetValue(name, out var v)) return v;
        return new Undefined($"'{TypeName(target)} object' has no attribute '{name}'");
    }

    /// <summary>Jinja's getitem: an item first, then (for a string key) an attribute.</summary>
    internal static object? GetItem(object? target, object? key)
    {
        switch (target)
        {
            case Undefined u:
                throw new JinjaError($"'{u.Name}' is undefined");
            case OrderedDictionary<string, object?> d when key is string k && d.TryGetValue(k, out var v):
                return v;
            case IList<object?> l when IsInteger(key):
            {
                long i = ToLong(key);
                if (i < 0) i += l.Count;
                return i >= 0 && i < l.Count ? l[(int)i] : new Undefined($"list index {ToLong(key)} out of range");
            }

            case string s when IsInteger(key):
            {
                long i = ToLong(key);
                if (i < 0) i += s.Length;
                return i >= 0 && i < s.Length ? s[(int)i].ToString() : new Undefined($"string index {ToLong(key)} out of range");
            }
        }

        if (key is string name) return GetAttr(target, name);
        return new Undefined($"'{TypeName(target)} object' has no element {Repr(key)}");
    }

    /// <summary>Python slicing of a list, tuple or string, negative bounds and steps included.</summary>
    internal static object? Slice(object? target, object? start, object? stop, object? step)
    {
        int count = target switch
        {
            string s => s.Length,
            IList<object?> l => l.Count,
            Undefined u => throw new JinjaError($"'{u.Name}' is undefined"),
            _ => throw new JinjaError($"'{TypeName(target)}' object is not subscriptable"),
        };
        long st = step == null ? 1 : ToLong(step);
        if (st == 0) throw new JinjaError("slice step cannot be zero");
        long Bound(object? v, long fallback)
        {
            if (v == null) return fallback;
            long x = ToLong(v);
            if (x < 0) x += count;
            return st > 0 ? Math.Clamp(x, 0, count) : Math.Clamp(x, -1, count - 1);
        }

        long from = Bound(start, st > 0 ? 0 : count - 1), to = Bound(stop, st > 0 ? count : -1);
        var indices = new List<int>();
        for (long i = from; st > 0 ? i < to : i > to; i += st) indices.Add((int)i);
        return target switch
        {
            string s => string.Concat(indices.Select(i => s[i])),
            object?[] t => indices.Select(i => t[i]).ToArray(),
            IList<object?> l => indices.Select(i => l[i]).ToList(),
            _ => null,
        };
    }
}
