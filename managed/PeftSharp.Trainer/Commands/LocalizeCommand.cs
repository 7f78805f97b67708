using System.CommandLine;
using PeftSharp.Training;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft localize`: skill localization by grafting; writes a sparse delta.</summary>
internal static class LocalizeCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var budget = new Option<double>("--budget") { Description = "Fraction of all parameters to graft (e.g. 0.001)", DefaultValueFactory = _ => 0.001 };
        var localizeSteps = new Option<int>("--steps") { Description = "Mask optimisation steps", DefaultValueFactory = _ => 30 };
        var localizeData = new Option<string>("--data") { Description = "The fine-tune's task data (builtin:tasks=NAME | FILE.jsonl)", DefaultValueFactory = _ => "builtin:tasks" };
        var localize = new Command("localize", "Skill localization: find the few fine-tuned entries that, grafted onto the base, keep the fine-tune's task performance; writes a sparse delta.");
        foreach (var opt in new Option[] { o.Device, o.Base, o.Finetuned, o.Out, budget, localizeSteps, localizeData, o.BatchSize, o.SeqLen, o.Seed, o.Overwrite }) localize.Options.Add(opt);
        localize.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Base)!, r.GetValue(o.Finetuned)!, r.GetValue(o.Out)!, r.GetValue(budget),
            r.GetValue(localizeSteps), r.GetValue(localizeData)!, r.GetValue(o.BatchSize), r.GetValue(o.SeqLen), r.GetValue(o.Seed), r.GetValue(o.Overwrite), stdout));
        return localize;
    }

    private static int Run(string? deviceSpec, string baseDir, string fineDir, string outDir, double budget, int steps, string dataSpec, int batchSize, int seqLen, int seed,
        bool overwrite, TextWriter stdout)
    {
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--base", baseDir), ("--finetuned", fineDir));
        if (budget is <= 0 or > 1) throw new ArgumentException($"--budget {budget}: must be in (0, 1]");
        if (steps < 0) throw new ArgumentException($"--steps {steps}: must be >= 0");
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = Host.LoadTextModel(baseDir, device);
        using var fine = Host.LoadTextModel(fineDir, device);
        var data = Jobs.Data(dataSpec, seed, baseModel.Tokenizer, seqLen);
        var (train, held) = (data.Train, data.HeldOut);
        var batches = train.EncodeBatches(baseModel.Tokenizer, 8, batchSize, seqLen, completionOnly: true, rewind: false);
        var result = Grafting.Localize(baseModel, fine, batches, batchSize, budget, steps);
        result.Delta.Save(outDir, baseModel.Config);
        result.Delta.ApplyTo(baseModel);
        string scored = "no held-out data to score (builtin tasks hold out their own)";
        if (held.Count > 0)
        {
            var grafted = Evaluator.Evaluate(baseModel, held, seqLen);
            var full = Evaluator.Evaluate(fine, held, seqLen);
            scored = $"held-out exact match {grafted.ExactMatch:P1} grafted vs {full.ExactMatch:P1} fine-tuned";
        }

        stdout.WriteLine($"grafted {result.Entries:N0} entries ({100 * result.Density:F3}% of the model): task loss {result.LossBefore:F4} -> {result.LossAfter:F4} over {steps} mask steps; " +
            $"{scored}; sparse delta in {Path.GetFullPath(outDir)}");
        return 0;
    }
}
