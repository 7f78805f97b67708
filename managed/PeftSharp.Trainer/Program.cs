using System.CommandLine;
using PeftSharp.Trainer.Commands;

namespace PeftSharp.Trainer;

/// <summary>
/// The `peft` host: wires each command (Commands/<Name>Command.cs: its flags and its action, which calls the library)
/// into one parser. Every bad flag is a one-line error and exit code 2.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        using var interrupt = Host.HandleInterrupts(Console.Error);
        return Run(args, Console.Out, Console.Error);
    }

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var o = new SharedOptions();
        var root = new RootCommand("PeftSharp: fine-tune and serve many variants of one transformer.");
        foreach (var command in new[]
        {
            DevicesCommand.Create(o, stdout),
            SelfCheckCommand.Create(o, stdout, stderr),
            TrainCommand.Create(o, "pretrain", "Pre-train a model from scratch.", finetune: false, stdout),
            TrainCommand.Create(o, "finetune", "Fine-tune a model folder (loss on completions).", finetune: true, stdout),
            EvalCommand.Create(o, stdout),
            GenerateCommand.Create(o, stdout, stderr),
            ServeCommand.Create(o, stdout),
            LogitsCommand.Create(o, stdout),
            TokenizeCommand.Create(o, stdout),
            CompressCommand.Create(o, stdout),
            LocalizeCommand.Create(o, stdout),
            InspectCommand.Create(o, stdout),
            MergeCommand.Create(o, stdout),
            QuickstartCommand.Create(o, stdout, stderr),
        })
        {
            root.Subcommands.Add(command);
        }

        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            foreach (var e in parse.Errors) stderr.WriteLine($"peft: {e.Message}{Suggestion(e.Message, parse.CommandResult.Command)}");
            return 2;
        }

        try
        {
            return parse.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            return Report(e, stderr, args);
        }
    }

    /// <summary>Exit code 2 for bad input: flags, files, and the disk (full, read-only, permission denied).</summary>
    public const int BadInput = 2;

    /// <summary>Exit code 1 for a bug in PeftSharp: the stack trace follows the one-line message.</summary>
    public const int InternalError = 1;

    /// <summary>Exit code 3: training stopped at a non-finite loss or gradient norm (nothing non-finite was written).</summary>
    public const int Diverged = 3;

    /// <summary>Exit code 130 (128 + SIGINT, as shells report Ctrl-C): training stopped at a step boundary with a checkpoint.</summary>
    public const int Interrupted = 130;

    /// <summary>
    /// One line on stderr for what the user can fix (<see cref="BadInput"/>); a bug in PeftSharp also prints its stack
    /// trace, for the report (<see cref="InternalError"/>). Never the runtime's "Unhandled exception" and exit 134.
    /// </summary>
    public static int Report(Exception e, TextWriter stderr, IReadOnlyList<string>? args = null)
    {
        while (e is AggregateException { InnerExceptions.Count: 1 } a) e = a.InnerExceptions[0];
        if (e is PeftSharp.Training.TrainingInterruptedException stop)
        {
            stderr.WriteLine($"peft: {stop.Message}");
            if (stop.Checkpoint != null && args != null) stderr.WriteLine($"peft: to go on: peft {ResumeCommand(args, stop.Checkpoint)}");
            return Interrupted;
        }

        if (e is PeftSharp.Training.TrainingDivergedException)
        {
            stderr.WriteLine($"peft: {e.Message}");
            return Diverged;
        }

        if (IsBadInput(e))
        {
            stderr.WriteLine($"peft: {ListOneItemALine(e.Message.ReplaceLineEndings(" "))}");
            return BadInput;
        }

        stderr.WriteLine($"peft: internal error (a bug in PeftSharp; please report it with what follows): {e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}");
        stderr.WriteLine(e.ToString());
        return InternalError;
    }

    /// <summary>
    /// What the user can fix: bad files and flags, IO faults, and PeftSharp refusing a combination the flags asked for
    /// (an InvalidOperationException thrown by PeftSharp's own code: "the model already has prefix tuning"). The same
    /// type thrown by the runtime ("Sequence contains no elements") is a bug, reported with its stack trace.
    /// </summary>
    private static bool IsBadInput(Exception e) =>
        e is PeftSharpInputException or NotSupportedException or ArgumentException or IOException or UnauthorizedAccessException
        || (e is InvalidOperationException and not ObjectDisposedException && e.TargetSite?.DeclaringType?.Namespace?.StartsWith("PeftSharp", StringComparison.Ordinal) == true);

    /// <summary>The command line that continues an interrupted run: the same flags, --resume naming its checkpoint.</summary>
    internal static string ResumeCommand(IReadOnlyList<string> args, string checkpoint)
    {
        var kept = new List<string>();
        for (int i = 0; i < args.Count; i++)
        {
            if (args[i] == "--resume")
            {
                i++; // and its value
                continue;
            }

            if (!args[i].StartsWith("--resume=", StringComparison.Ordinal)) kept.Add(args[i]);
        }

        kept.Add("--resume");
        kept.Add(checkpoint);
        return string.Join(' ', kept.Select(a => a.Length > 0 && a.All(c => char.IsLetterOrDigit(c) || "-_=./:,@+".Contains(c)) ? a : $"'{a.Replace("'", "'\\''")}'"));
    }

    /// <summary>
    /// For an unrecognized '--flag' in a parse error, the command's nearest flag (at most two edits away, or the only
    /// one it starts): " (did you mean --device?)"; otherwise nothing.
    /// </summary>
    internal static string Suggestion(string message, Command command)
    {
        var m = System.Text.RegularExpressions.Regex.Match(message, "'(--?[^']+)'");
        if (!m.Success || !message.StartsWith("Unrecognized", StringComparison.Ordinal)) return "";
        string given = m.Groups[1].Value.Split('=')[0];
        var names = command.Options.SelectMany(o => o.Aliases.Append(o.Name)).Where(n => n.StartsWith("--", StringComparison.Ordinal)).Distinct().ToList();
        var best = names.Select(n => (Name: n, Distance: EditDistance(given, n))).OrderBy(x => x.Distance).ThenBy(x => x.Name, StringComparer.Ordinal).FirstOrDefault();
        if (best.Name != null && best.Distance <= 2) return $" (did you mean {best.Name}?)";
        var prefixed = names.Where(n => n.StartsWith(given, StringComparison.Ordinal)).ToList();
        return prefixed.Count == 1 ? $" (did you mean {prefixed[0]}?)" : "";
    }

    private static int EditDistance(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            for (int j = 1; j <= b.Length; j++)
            {
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            }
        }

        return d[a.Length, b.Length];
    }

    /// <summary>
    /// A message that ends in a long list ("...(12 problems): a; b; c; ...") as its head and one item a line, so a
    /// reader can scan it; shorter messages stay one line.
    /// </summary>
    public static string ListOneItemALine(string message)
    {
        int colon = message.IndexOf(": ", StringComparison.Ordinal);
        int listAt = message.IndexOf("): ", StringComparison.Ordinal) is int p and >= 0 ? p + 1 : colon;
        if (listAt < 0) return message;
        var items = message[(listAt + 2)..].Split("; ");
        if (items.Length < 4) return message;
        return message[..(listAt + 1)] + string.Concat(items.Select(i => $"{Environment.NewLine}  - {i}"));
    }
}
