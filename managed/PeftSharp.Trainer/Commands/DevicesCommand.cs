using System.CommandLine;
using PeftSharp.Engine;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft devices`: every accelerator found and the one auto picks.</summary>
internal static class DevicesCommand
{
    public static Command Create(TextWriter stdout)
    {
        var devices = new Command("devices", "List every accelerator found and the one auto picks.");
        devices.SetAction(_ => Run(stdout));
        return devices;
    }

    private static int Run(TextWriter stdout)
    {
        var console = Host.Console(stdout);
        var all = Devices.List();
        string auto = Devices.AutoSpec(all);
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
}
