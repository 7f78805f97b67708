using System.CommandLine;
using PeftSharp.Engine;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft devices`: every accelerator found and the one auto picks.</summary>
internal static class DevicesCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var devices = new Command("devices", "List every accelerator found and the one auto picks.");
        devices.Options.Add(o.Json);
        devices.SetAction(r => Run(r.GetValue(o.Json), stdout));
        return devices;
    }

    private static int Run(bool json, TextWriter stdout)
    {
        var console = Host.Console(stdout);
        var all = Devices.List();
        string auto = Devices.AutoSpec(all);
        if (json)
        {
            // One object: the devices found, what was probed and not found, and the one auto picks.
            var doc = new System.Text.Json.Nodes.JsonObject
            {
                ["devices"] = new System.Text.Json.Nodes.JsonArray(all.Select(d => (System.Text.Json.Nodes.JsonNode)new System.Text.Json.Nodes.JsonObject
                {
                    ["spec"] = d.Spec, ["kind"] = d.Kind.ToString(), ["name"] = d.Name, ["memory_bytes"] = d.MemoryBytes, ["warp_size"] = d.WarpSize,
                    ["max_group_size"] = d.MaxGroupSize, ["detail"] = d.Detail,
                }).ToArray()),
                ["not_found"] = new System.Text.Json.Nodes.JsonArray(Devices.ProbeNotes.Select(n => (System.Text.Json.Nodes.JsonNode)n).ToArray()),
                ["auto"] = auto,
            };
            stdout.WriteLine(doc.ToJsonString());
            return 0;
        }

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
