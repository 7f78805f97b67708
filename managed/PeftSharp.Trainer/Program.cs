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
            DevicesCommand.Create(stdout),
            SelfCheckCommand.Create(o, stdout, stderr),
            TrainCommand.Create(o, "pretrain", "Pre-train a model from scratch.", finetune: false, stdout),
            TrainCommand.Create(o, "finetune", "Fine-tune a model folder (loss on completions).", finetune: true, stdout),
            EvalCommand.Create(o, stdout),
            GenerateCommand.Create(o, stdout, stderr),
            LogitsCommand.Create(o, stdout),
            TokenizeCommand.Create(o, stdout),
            CompressCommand.Create(o, stdout),
            LocalizeCommand.Create(o, stdout),
            MergeCommand.Create(o, stdout),
            QuickstartCommand.Create(o, stdout),
        })
        {
            root.Subcommands.Add(command);
        }

        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            foreach (var e in parse.Errors) stderr.WriteLine($"peft: {e.Message}");
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
            stderr.WriteLine($"peft: {e.Message.ReplaceLineEndings(" ")}");
            return BadInput;
        }

        stderr.WriteLine($"peft: internal error (a bug in PeftSharp; please report it with what follows): {e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}");
        stderr.WriteLine(e.ToString());
        return InternalError;
    }

    private static bool IsBadInput(Exception e) =>
        e is PeftSharpInputException or NotSupportedException or ArgumentException or IOException or UnauthorizedAccessException;

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
}
