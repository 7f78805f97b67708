using System.CommandLine;
using PeftSharp.Formats;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft logits`: the last position's logits as JSON.</summary>
internal static class LogitsCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var tokens = new Option<string>("--tokens") { Description = "Comma-separated token ids", Required = true };
        var logits = new Command("logits", "Print the last position's logits as JSON (for checks against other implementations).");
        foreach (var opt in new Option[] { o.Device, o.Model, tokens }) logits.Options.Add(opt);
        logits.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Model)!, r.GetValue(tokens)!, stdout));
        return logits;
    }

    private static int Run(string? deviceSpec, string modelDir, string tokenList, TextWriter stdout)
    {
        var ids = tokenList.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(t => int.TryParse(t, out int v) ? v : throw new ArgumentException($"--tokens: '{t}' is not a token id")).ToArray();
        if (ids.Length == 0) throw new ArgumentException("--tokens: no token ids given");
        using var device = Host.OpenDevice(deviceSpec);
        using var model = HuggingFaceFolder.Load(modelDir, device, Host.Warn);
        var bad = ids.Where(t => t < 0 || t >= model.Config.VocabSize).ToArray();
        if (bad.Length > 0) throw new ArgumentException($"--tokens: ids {string.Join(", ", bad)} are outside the vocabulary [0, {model.Config.VocabSize})");
        var logits = model.Logits(ids, batch: 1);
        var last = logits.AsSpan((ids.Length - 1) * model.Config.VocabSize, model.Config.VocabSize).ToArray();
        stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(last));
        return 0;
    }
}
