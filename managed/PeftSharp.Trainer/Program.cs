using System.CommandLine;
using PeftSharp.Engine;
using Spectre.Console;

namespace PeftSharp.Trainer;

/// <summary>The `peft` host: parses flags, calls the library, reports. Every bad flag is a one-line error and exit code 2.</summary>
public static class Program
{
    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var deviceOption = new Option<string>("--device")
        {
            Description = $"auto | cpu | cuda[:i] | opencl[:i] | ilgpu-cpu (default: ${Devices.EnvironmentVariable}, else auto)",
        };

        var root = new RootCommand("PeftSharp: fine-tune and serve many variants of one transformer.");

        var devices = new Command("devices", "List every accelerator found and the one auto picks.");
        devices.SetAction(_ => Commands.ListDevices(stdout));
        root.Subcommands.Add(devices);

        var selfcheck = new Command("selfcheck", "Run a short kernel check against the double-precision references, on --device or on every device found.");
        selfcheck.Options.Add(deviceOption);
        selfcheck.SetAction(r => Commands.SelfCheck(r.GetValue(deviceOption), stdout, stderr));
        root.Subcommands.Add(selfcheck);

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
        catch (ArgumentException e)
        {
            stderr.WriteLine($"peft: {e.Message}");
            return 2;
        }
    }
}

internal static class Commands
{
    public static int ListDevices(TextWriter stdout)
    {
        var console = Console(stdout);
        var all = Devices.List();
        string auto = Devices.AutoSpec();
        var table = new Table().AddColumns("spec", "kind", "name", "memory", "warp", "max group", "detail");
        foreach (var d in all)
        {
            table.AddRow(
                Markup.Escape(d.Spec + (d.Spec == auto ? " (auto)" : "")), d.Kind.ToString(), Markup.Escape(d.Name),
                d.MemoryBytes > 0 ? $"{d.MemoryBytes / (1024.0 * 1024 * 1024):F1} GiB" : "-", d.WarpSize.ToString(), d.MaxGroupSize.ToString(), Markup.Escape(d.Detail));
        }

        console.Write(table);
        foreach (var note in Devices.ProbeNotes) console.MarkupLine($"[grey]not found: {Markup.Escape(note)}[/]");
        console.MarkupLine($"auto picks [bold]{Markup.Escape(auto)}[/]");
        return 0;
    }

    public static int SelfCheck(string? spec, TextWriter stdout, TextWriter stderr)
    {
        var console = Console(stdout);
        string? chosen = spec is { Length: > 0 } ? spec : Environment.GetEnvironmentVariable(Devices.EnvironmentVariable);
        var specs = chosen is { Length: > 0 } ? new[] { chosen } : Devices.List().Select(d => d.Spec).ToArray();
        int failed = 0;
        foreach (var s in specs)
        {
            using var device = Devices.Open(s);
            console.MarkupLine($"self-check on [bold]{Markup.Escape(device.Info.Spec)}[/] ({Markup.Escape(device.Info.Name)}; {Markup.Escape(device.Info.Detail)})");
            var results = PeftSharp.Engine.SelfCheck.Run(device);
            var table = new Table().AddColumns("op", "shape", "max error", "tolerance", "time (incl. compile)", "result");
            foreach (var r in results)
            {
                table.AddRow(r.Op, r.Shape, r.MaxError.ToString("G3"), r.Tolerance.ToString("G3"), $"{r.Elapsed.TotalMilliseconds:F1} ms", r.Passed ? "[green]ok[/]" : "[red]FAILED[/]");
            }

            console.Write(table);
            int bad = results.Count(r => !r.Passed);
            if (bad > 0) stderr.WriteLine($"peft: {bad} self-check op(s) failed on {device.Info.Spec}");
            failed += bad;
        }

        console.MarkupLine(failed == 0 ? $"[green]all kernels agree with the references on {specs.Length} device(s)[/]" : "[red]self-check failed[/]");
        return failed == 0 ? 0 : 1;
    }

    private static IAnsiConsole Console(TextWriter writer)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(writer),
            Ansi = writer == System.Console.Out ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = writer == System.Console.Out ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        if (writer != System.Console.Out || System.Console.IsOutputRedirected) console.Profile.Width = 160;
        return console;
    }
}
