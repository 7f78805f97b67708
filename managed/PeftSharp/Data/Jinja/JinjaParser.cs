namespace PeftSharp.Data.Jinja;

/// <summary>
/// Parses the lexer's segments into statements with Jinja2's grammar and precedence: <c>x if t else y</c>, or, and,
/// not, comparisons (chained, with <c>in</c> / <c>not in</c>), + -, ~, * / // %, **, unary - +, then postfix
/// <c>.attr</c>, <c>[key]</c>, <c>[a:b:c]</c>, calls, and filters <c>|f(args)</c> and tests <c>is [not] t(args)</c>
/// binding tighter than any operator. Statements: if / elif / else, for (targets, <c>if</c> filter, else), set (name,
/// tuple, <c>ns.attr</c>, block), macro, break, continue, Hugging Face's generation. Anything else (include, import,
/// extends, block, call, filter, with, do, ...) is refused with its line.
/// </summary>
internal sealed class JinjaParser
{
    private static readonly HashSet<string> Unsupported = new()
    {
        "include", "import", "from", "extends", "block", "call", "filter", "with", "autoescape", "do", "trans", "pluralize",
    };

    private readonly List<Segment> segments;
    private readonly string origin;
    private int next;
    private List<Token> tokens = new();
    private int at;

    private JinjaParser(List<Segment> segments, string origin)
    {
        this.segments = segments;
        this.origin = origin;
    }

    public static List<Node> Parse(string source, string origin)
    {
        var parser = new JinjaParser(JinjaLexer.Split(source, origin), origin);
        var (body, end) = parser.ParseBody();
        if (end != null) throw parser.Error($"unexpected {{% {end} %}}");
        return body;
    }

    private Token Current => tokens[at];

    /// <summary>Statements up to one of <paramref name="ends"/> (returned, its tag's tokens left to read) or the end.</summary>
    private (List<Node> Body, string? End) ParseBody(params string[] ends)
    {
        var body = new List<Node>();
        while (next < segments.Count)
        {
            var seg = segments[next++];
            if (seg.Kind == SegmentKind.Text)
            {
                body.Add(new TextNode(seg.Text, seg.Line));
                continue;
            }

            tokens = seg.Tokens;
            at = 0;
            if (seg.Kind == SegmentKind.Output)
            {
                var value = ParseExpression();
                ExpectEnd();
                body.Add(new OutputNode(value, seg.Line));
                continue;
            }

            var head = Current;
            if (head.Kind != TokenKind.Name) throw Error("a statement tag must start with a keyword");
            if (ends.Contains(head.Text))
            {
                at++;
                return (body, head.Text);
            }

            at++;
            body.Add(ParseStatement(head.Text, seg.Line));
        }

        if (ends.Length > 0) throw JinjaLexer.Error(origin, segments.Count > 0 ? segments[^1].Line : 1, $"the template ends before {{% {ends[^1]} %}}");
        return (body, null);
    }

    private Node ParseStatement(string keyword, int line)
    {
        switch (keyword)
        {
            case "if":
            {
                var branches = new List<(Expr, List<Node>)>();
                var test = ParseExpression();
                ExpectEnd();
                while (true)
                {
                    var (body, end) = ParseBody("elif", "else", "endif");
                    branches.Add((test, body));
                    if (end == "elif")
                    {
                        test = ParseExpression();
                        ExpectEnd();
                        continue;
                    }

                    var elseBody = new List<Node>();
                    if (end == "else")
                    {
                        ExpectEnd();
                        (elseBody, _) = ParseBody("endif");
                    }

                    ExpectEnd();
                    return new IfNode(branches, elseBody, line);
                }
            }

            case "for":
            {
                var targets = new List<string> { ExpectName() };
                while (Current.Is(","))
                {
                    at++;
                    targets.Add(ExpectName());
                }

                if (!Current.IsName("in")) throw Error("expected 'in' in the for statement");
                at++;
                var items = ParseConditional(allowConditional: false);
                Expr? filter = null;
                if (Current.IsName("if"))
                {
                    at++;
                    filter = ParseConditional(allowConditional: false);
                }

                if (Current.IsName("recursive")) throw NotSupported("recursive for loops are not supported");
                ExpectEnd();
                var (body, end) = ParseBody("else", "endfor");
                var elseBody = new List<Node>();
                if (end == "else")
                {
                    ExpectEnd();
                    (elseBody, _) = ParseBody("endfor");
                }

                ExpectEnd();
                return new ForNode(targets.ToArray(), items, filter, body, elseBody, line);
            }

            case "set":
            {
                string first = ExpectName();
                if (Current.Is("."))
                {
                    at++;
                    string attr = ExpectName();
                    Expect("=");
                    var value = ParseTuple();
                    ExpectEnd();
                    return new SetNode(new[] { attr }, first, value, line);
                }

                var targets = new List<string> { first };
                while (Current.Is(","))
                {
                    at++;
                    targets.Add(ExpectName());
                }

                if (Current.Kind == TokenKind.End && targets.Count == 1)
                {
                    ExpectEnd();
                    var (body, _) = ParseBody("endset");
                    ExpectEnd();
                    return new SetBlockNode(first, body, line);
                }

                Expect("=");
                var v = ParseTuple();
                ExpectEnd();
                return new SetNode(targets.ToArray(), null, v, line);
            }

            case "macro":
            {
                string name = ExpectName();
                Expect("(");
                var parameters = new List<string>();
                var defaults = new List<Expr?>();
                while (!Current.Is(")"))
                {
                    parameters.Add(ExpectName());
                    if (Current.Is("="))
                    {
                        at++;
                        defaults.Add(ParseExpression());
                    }
                    else
                    {
                        if (defaults.Any(d => d != null)) throw Error("a macro parameter without a default follows one with a default");
                        defaults.Add(null);
                    }

                    if (!Current.Is(",")) break;
                    at++;
                }

                Expect(")");
                ExpectEnd();
                var (body, _) = ParseBody("endmacro");
                ExpectEnd();
                return new MacroNode(name, parameters.ToArray(), defaults.ToArray(), body, line);
            }

            case "break":
                ExpectEnd();
                return new BreakNode(line);
            case "continue":
                ExpectEnd();
                return new ContinueNode(line);
            case "generation":
            {
                ExpectEnd();
                var (body, _) = ParseBody("endgeneration");
                ExpectEnd();
                return new GenerationNode(body, line);
            }

            default:
                if (Unsupported.Contains(keyword)) throw NotSupported($"the {{% {keyword} %}} statement is not supported");
                throw Error($"unknown statement {{% {keyword} %}}");
        }
    }

    /// <summary>An expression, or a tuple when commas follow (<c>set a, b = 1, 2</c>).</summary>
    private Expr ParseTuple()
    {
        int line = Current.Line;
        var first = ParseExpression();
        if (!Current.Is(",")) return first;
        var items = new List<Expr> { first };
        while (Current.Is(","))
        {
            at++;
            if (Current.Kind == TokenKind.End) break;
            items.Add(ParseExpression());
        }

        return new ListExpr(items, true, line);
    }

    private Expr ParseExpression() => ParseConditional(allowConditional: true);

    private Expr ParseConditional(bool allowConditional)
    {
        var expr = ParseOr();
        while (allowConditional && Current.IsName("if"))
        {
            int line = Current.Line;
            at++;
            var test = ParseOr();
            Expr? otherwise = null;
            if (Current.IsName("else"))
            {
                at++;
                otherwise = ParseConditional(true);
            }

            expr = new ConditionalExpr(test, expr, otherwise, line);
        }

        return expr;
    }

    private Expr ParseOr()
    {
        var left = ParseAnd();
        while (Current.IsName("or"))
        {
            int line = Current.Line;
            at++;
            left = new OrExpr(left, ParseAnd(), line);
        }

        return left;
    }

    private Expr ParseAnd()
    {
        var left = ParseNot();
        while (Current.IsName("and"))
        {
            int line = Current.Line;
            at++;
            left = new AndExpr(left, ParseNot(), line);
        }

        return left;
    }

    private Expr ParseNot()
    {
        if (Current.IsName("not"))
        {
            int line = Current.Line;
            at++;
            return new NotExpr(ParseNot(), line);
        }

        return ParseCompare();
    }

    private Expr ParseCompare()
    {
        int line = Current.Line;
        var first = ParseAdd();
        var rest = new List<(string, Expr)>();
        while (true)
        {
            var t = Current;
            if (t.Kind == TokenKind.Operator && t.Text is "==" or "!=" or "<" or ">" or "<=" or ">=")
            {
                at++;
                rest.Add((t.Text, ParseAdd()));
            }
            else if (t.IsName("in"))
            {
                at++;
                rest.Add(("in", ParseAdd()));
            }
            else if (t.IsName("not") && tokens[at + 1].IsName("in"))
            {
                at += 2;
                rest.Add(("not in", ParseAdd()));
            }
            else
            {
                break;
            }
        }

        return rest.Count == 0 ? first : new CompareExpr(first, rest, line);
    }

    private Expr ParseAdd()
    {
        var left = ParseConcat();
        while (Current.Is("+") || Current.Is("-"))
        {
            var op = Current;
            at++;
            left = new BinaryExpr(op.Text, left, ParseConcat(), op.Line);
        }

        return left;
    }

    private Expr ParseConcat()
    {
        var left = ParseMultiply();
        while (Current.Is("~"))
        {
            int line = Current.Line;
            at++;
            left = new BinaryExpr("~", left, ParseMultiply(), line);
        }

        return left;
    }

    private Expr ParseMultiply()
    {
        var left = ParsePower();
        while (Current.Kind == TokenKind.Operator && Current.Text is "*" or "/" or "//" or "%")
        {
            var op = Current;
            at++;
            left = new BinaryExpr(op.Text, left, ParsePower(), op.Line);
        }

        return left;
    }

    private Expr ParsePower()
    {
        var left = ParseUnary(true);
        while (Current.Is("**"))
        {
            int line = Current.Line;
            at++;
            left = new BinaryExpr("**", left, ParseUnary(true), line);
        }

        return left;
    }

    private Expr ParseUnary(bool withFilter)
    {
        var t = Current;
        Expr node;
        if (t.Is("-") || t.Is("+"))
        {
            at++;
            node = new NegateExpr(ParseUnary(false), t.Text == "-", t.Line);
        }
        else
        {
            node = ParsePrimary();
        }

        node = ParsePostfix(node);
        return withFilter ? ParseFilters(node) : node;
    }

    private Expr ParsePrimary()
    {
        var t = Current;
        at++;
        switch (t.Kind)
        {
            case TokenKind.Name:
                return t.Text switch
                {
                    "true" or "True" => new LiteralExpr(true, t.Line),
                    "false" or "False" => new LiteralExpr(false, t.Line),
                    "none" or "None" => new LiteralExpr(null, t.Line),
                    _ => new NameExpr(t.Text, t.Line),
                };
            case TokenKind.String:
            {
                string text = (string)t.Value!;
                while (Current.Kind == TokenKind.String)
                {
                    text += (string)Current.Value!;
                    at++;
                }

                return new LiteralExpr(text, t.Line);
            }

            case TokenKind.Integer:
            case TokenKind.Float:
                return new LiteralExpr(t.Value, t.Line);
        }

        if (t.Is("("))
        {
            if (Current.Is(")"))
            {
                at++;
                return new ListExpr(new List<Expr>(), true, t.Line);
            }

            var first = ParseExpression();
            if (Current.Is(")"))
            {
                at++;
                return first;
            }

            var items = new List<Expr> { first };
            while (Current.Is(","))
            {
                at++;
                if (Current.Is(")")) break;
                items.Add(ParseExpression());
            }

            Expect(")");
            return new ListExpr(items, true, t.Line);
        }

        if (t.Is("["))
        {
            var items = new List<Expr>();
            while (!Current.Is("]"))
            {
                items.Add(ParseExpression());
                if (!Current.Is(",")) break;
                at++;
            }

            Expect("]");
            return new ListExpr(items, false, t.Line);
        }

        if (t.Is("{"))
        {
            var items = new List<(Expr, Expr)>();
            while (!Current.Is("}"))
            {
                var key = ParseExpression();
                Expect(":");
                items.Add((key, ParseExpression()));
                if (!Current.Is(",")) break;
                at++;
            }

            Expect("}");
            return new DictExpr(items, t.Line);
        }

        at--;
        throw Error(t.Kind == TokenKind.End ? "an expression was expected" : $"unexpected '{t.Text}'");
    }

    private Expr ParsePostfix(Expr node)
    {
        while (true)
        {
            var t = Current;
            if (t.Is("."))
            {
                at++;
                var name = Current;
                at++;
                if (name.Kind == TokenKind.Name) node = new AttrExpr(node, name.Text, t.Line);
                else if (name.Kind == TokenKind.Integer) node = new ItemExpr(node, new LiteralExpr(name.Value, t.Line), t.Line);
                else throw Error("expected a name after '.'");
            }
            else if (t.Is("["))
            {
                at++;
                node = ParseSubscript(node, t.Line);
            }
            else if (t.Is("("))
            {
                node = ParseCall(node);
            }
            else
            {
                return node;
            }
        }
    }

    private Expr ParseSubscript(Expr target, int line)
    {
        Expr? start = null, stop = null, step = null;
        if (!Current.Is(":")) start = ParseExpression();
        if (!Current.Is(":"))
        {
            Expect("]");
            return new ItemExpr(target, start!, line);
        }

        at++;
        if (!Current.Is(":") && !Current.Is("]")) stop = ParseExpression();
        if (Current.Is(":"))
        {
            at++;
            if (!Current.Is("]")) step = ParseExpression();
        }

        Expect("]");
        return new SliceExpr(target, start, stop, step, line);
    }

    private CallExpr ParseCall(Expr target)
    {
        int line = Current.Line;
        var (args, kwargs) = ParseArguments();
        return new CallExpr(target, args, kwargs, line);
    }

    private (List<Expr> Args, List<(string, Expr)> Kwargs) ParseArguments()
    {
        Expect("(");
        var args = new List<Expr>();
        var kwargs = new List<(string, Expr)>();
        while (!Current.Is(")"))
        {
            if (Current.Is("*") || Current.Is("**")) throw NotSupported("*args and **kwargs in calls are not supported");
            if (Current.Kind == TokenKind.Name && tokens[at + 1].Is("="))
            {
                string name = Current.Text;
                at += 2;
                kwargs.Add((name, ParseExpression()));
            }
            else
            {
                if (kwargs.Count > 0) throw Error("a positional argument follows a keyword argument");
                args.Add(ParseExpression());
            }

            if (!Current.Is(",")) break;
            at++;
        }

        Expect(")");
        return (args, kwargs);
    }

    private Expr ParseFilters(Expr node)
    {
        while (true)
        {
            var t = Current;
            if (t.Is("|"))
            {
                at++;
                string name = ExpectDottedName();
                var args = new List<Expr>();
                var kwargs = new List<(string, Expr)>();
                if (Current.Is("(")) (args, kwargs) = ParseArguments();
                node = new FilterExpr(node, name, args, kwargs, t.Line);
            }
            else if (t.IsName("is"))
            {
                at++;
                bool negated = false;
                if (Current.IsName("not"))
                {
                    negated = true;
                    at++;
                }

                string name = ExpectDottedName();
                var args = new List<Expr>();
                if (Current.Is("("))
                {
                    var (a, kw) = ParseArguments();
                    if (kw.Count > 0) throw NotSupported("keyword arguments to tests are not supported");
                    args = a;
                }
                else if (StartsArgument(Current))
                {
                    args.Add(ParsePostfix(ParsePrimary()));
                }

                node = new TestExpr(node, name, args, negated, t.Line);
            }
            else if (t.Is("("))
            {
                node = ParseCall(node);
            }
            else
            {
                return node;
            }
        }
    }

    /// <summary>Whether a test's single unparenthesised argument starts here (<c>is divisibleby 3</c>, <c>is sameas none</c>).</summary>
    private static bool StartsArgument(Token t) =>
        t.Kind is TokenKind.String or TokenKind.Integer or TokenKind.Float
        || (t.Kind == TokenKind.Name && t.Text is not ("else" or "or" or "and" or "if" or "in" or "not" or "is"))
        || t.Is("[") || t.Is("{");

    private string ExpectDottedName()
    {
        string name = ExpectName();
        while (Current.Is(".") && tokens[at + 1].Kind == TokenKind.Name)
        {
            at++;
            name += "." + ExpectName();
        }

        return name;
    }

    private string ExpectName()
    {
        var t = Current;
        if (t.Kind != TokenKind.Name) throw Error($"expected a name, found '{t.Text}'");
        at++;
        return t.Text;
    }

    private void Expect(string op)
    {
        if (!Current.Is(op)) throw Error($"expected '{op}', found '{Current.Text}'");
        at++;
    }

    private void ExpectEnd()
    {
        if (Current.Kind != TokenKind.End) throw Error($"unexpected '{Current.Text}' before the end of the tag");
    }

    private PeftSharpInputException Error(string message) => JinjaLexer.Error(origin, tokens.Count > 0 ? Current.Line : 1, message);

    private NotSupportedException NotSupported(string message) =>
        new($"{origin}: chat template line {(tokens.Count > 0 ? Current.Line : 1)}: {message} (PeftSharp renders a subset of Jinja; see ChatTemplate)");
}
