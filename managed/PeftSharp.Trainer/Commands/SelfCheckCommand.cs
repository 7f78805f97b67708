using System.CommandLine;
using PeftSharp.Engine;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft selfcheck`: each kernel family against its double-precision reference, on every device found.</summary>
internal static class SelfCheckCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout, TextWriter stderr)
    {
        var selfcheck = new Command("selfcheck", "Run a short kernel check against the double-precision references, on --device or on every device found.");
        selfcheck.Options.Add(o.Device);
        selfcheck.Options.Add(o.Json);
        selfcheck.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Json), stdout, stderr));
        return selfcheck;
    }

    private static int Run(string? spec, bool json, TextWriter stdout, TextWriter stderr)
    {
        var console = Host.Console(stdout);
        string? chosen = spec is { Length: > 0 } ? spec : Environment.GetEnvironmentVariable(Devices.EnvironmentVariable);
        var specs = chosen is { Length: > 0 } ? new[] { chosen } : Devices.List().Select(d => d.Spec).ToArray();
        int failed = 0;
        foreach (var s in specs)
        {
            using var device = Devices.Open(s);
            if (json)
            {
                // One line per op and device: what was compared, the error, the tolerance, the verdict.
                foreach (var r in PeftSharp.Engine.SelfCheck.Run(device))
                {
                    stdout.WriteLine(new System.Text.Json.Nodes.JsonObject
                    {
                        ["device"] = device.Info.Spec, ["op"] = r.Op, ["shape"] = r.Shape, ["max_error"] = r.MaxError, ["tolerance"] = r.Tolerance,
                        ["milliseconds"] = r.Elapsed.TotalMilliseconds, ["passed"] = r.Passed,
                    }.ToJsonString());
                    if (!r.Passed) failed++;
                }

                continue;
            }

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

        if (json) return failed == 0 ? 0 : 1;
        console.MarkupLine(failed == 0 ? $"[green]all kernels agree with the references on {specs.Length} device(s)[/]" : "[red]self-check failed[/]");
        return failed == 0 ? 0 : 1;
    }
}
