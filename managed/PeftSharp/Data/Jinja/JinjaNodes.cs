namespace PeftSharp.Data.Jinja;

/// <summary>A statement of a parsed template; <see cref="Line"/> is where it starts, for errors.</summary>
internal abstract record Node(int Line);

internal sealed record TextNode(string Text, int Line) : Node(Line);

internal sealed record OutputNode(Expr Value, int Line) : Node(Line);

/// <summary><c>{% if %}</c> with its <c>elif</c> branches in order; <see cref="Else"/> may be empty.</summary>
internal sealed record IfNode(List<(Expr Test, List<Node> Body)> Branches, List<Node> Else, int Line) : Node(Line);

/// <summary><c>{% for a, b in items if test %}</c> ... <c>{% else %}</c> ... (the else body runs when nothing was iterated).</summary>
internal sealed record ForNode(string[] Targets, Expr Items, Expr? Filter, List<Node> Body, List<Node> Else, int Line) : Node(Line);

/// <summary><c>{% set x = v %}</c>, <c>{% set a, b = v %}</c> or <c>{% set ns.attr = v %}</c> (<see cref="Namespace"/> non-null).</summary>
internal sealed record SetNode(string[] Targets, string? Namespace, Expr Value, int Line) : Node(Line);

/// <summary><c>{% set x %}</c> ... <c>{% endset %}</c>: the body's output, as a string.</summary>
internal sealed record SetBlockNode(string Target, List<Node> Body, int Line) : Node(Line);

internal sealed record MacroNode(string Name, string[] Parameters, Expr?[] Defaults, List<Node> Body, int Line) : Node(Line);

internal sealed record BreakNode(int Line) : Node(Line);

internal sealed record ContinueNode(int Line) : Node(Line);

/// <summary>Hugging Face's <c>{% generation %}</c> marks assistant text for masks; it renders its body unchanged.</summary>
internal sealed record GenerationNode(List<Node> Body, int Line) : Node(Line);

/// <summary>An expression.</summary>
internal abstract record Expr(int Line);

internal sealed record LiteralExpr(object? Value, int Line) : Expr(Line);

internal sealed record NameExpr(string Name, int Line) : Expr(Line);

internal sealed record ListExpr(List<Expr> Items, bool Tuple, int Line) : Expr(Line);

internal sealed record DictExpr(List<(Expr Key, Expr Value)> Items, int Line) : Expr(Line);

/// <summary><c>x.name</c>: attribute first, then item (Jinja's getattr).</summary>
internal sealed record AttrExpr(Expr Target, string Name, int Line) : Expr(Line);

/// <summary><c>x[key]</c>: item first, then attribute (Jinja's getitem).</summary>
internal sealed record ItemExpr(Expr Target, Expr Key, int Line) : Expr(Line);

internal sealed record SliceExpr(Expr Target, Expr? Start, Expr? Stop, Expr? Step, int Line) : Expr(Line);

internal sealed record CallExpr(Expr Target, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line) : Expr(Line);

internal sealed record FilterExpr(Expr Target, string Name, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line) : Expr(Line);

internal sealed record TestExpr(Expr Target, string Name, List<Expr> Args, bool Negated, int Line) : Expr(Line);

/// <summary>Arithmetic and <c>~</c>: + - * / // % ** ~.</summary>
internal sealed record BinaryExpr(string Op, Expr Left, Expr Right, int Line) : Expr(Line);

internal sealed record NegateExpr(Expr Operand, bool Minus, int Line) : Expr(Line);

/// <summary>A comparison chain as Python's: <c>a &lt; b &lt;= c</c>; operators == != &lt; &gt; &lt;= &gt;= in, "not in".</summary>
internal sealed record CompareExpr(Expr First, List<(string Op, Expr Right)> Rest, int Line) : Expr(Line);

internal sealed record AndExpr(Expr Left, Expr Right, int Line) : Expr(Line);

internal sealed record OrExpr(Expr Left, Expr Right, int Line) : Expr(Line);

internal sealed record NotExpr(Expr Operand, int Line) : Expr(Line);

/// <summary><c>a if test else b</c>; without else, an undefined value when the test fails.</summary>
internal sealed record ConditionalExpr(Expr Test, Expr Then, Expr? Else, int Line) : Expr(Line);
