using System.CommandLine;
using PeftSharp.Training;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft eval`: loss, perplexity and exact match on held-out data.</summary>
internal static class EvalCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var eval = new Command("eval", "Loss, perplexity and exact-match accuracy on held-out data.");
        foreach (var opt in new Option[] { o.Device, o.Model, o.Data, o.SeqLen, o.Seed }) eval.Options.Add(opt);
        eval.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Model)!, r.GetValue(o.Data)!, r.GetValue(o.SeqLen), r.GetValue(o.Seed), stdout));
        return eval;
    }

    private static int Run(string? deviceSpec, string modelDir, string dataSpec, int seqLen, int seed, TextWriter stdout)
    {
        var console = Host.Console(stdout);
        using var device = Host.OpenDevice(deviceSpec);
        using var model = Host.LoadTextModel(modelDir, device);
        var (_, held, _) = Jobs.Data(dataSpec, seed);
        // Examples with a prompt (every built-in task, JSONL prompt/completion) are scored on their completions, as
        // fine-tuning trains them and as the quickstart reports them; plain text on every token. Built-in tasks had
        // been scored on every token, prompt included: 6.68 against the quickstart's 4.86 for the same model and task.
        bool completionOnly = held.Any(e => e.Prompt.Length > 0);
        new Jobs(console, true).PrintEval($"{dataSpec} ({(completionOnly ? "loss on completions" : "loss on every token")})", Evaluator.Evaluate(model, held, seqLen, completionOnly));
        return 0;
    }
}
