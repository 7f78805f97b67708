using System.CommandLine;
using PeftSharp.Trainer.Commands;

namespace PeftSharp.Trainer;

/// <summary>
/// The `peft` host: wires each command (Commands/<Name>Command.cs: its flags and its action, which calls the library)
/// into one parser. Every bad flag is a one-line error and exit code 2.
/// </summary>
public static class Program
{
    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

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
        catch (Exception e) when (e is ArgumentException or FileNotFoundException or InvalidDataException or NotSupportedException or DirectoryNotFoundException)
        {
            stderr.WriteLine($"peft: {e.Message.ReplaceLineEndings(" ")}");
            return 2;
        }
    }
}
