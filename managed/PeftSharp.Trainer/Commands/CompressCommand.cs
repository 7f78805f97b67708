using System.CommandLine;
using PeftSharp.Compression;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft compress`: a fine-tune to 1-bit deltas over its base (BitDelta), with scale distillation.</summary>
internal static class CompressCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var distillSteps = new Option<int>("--distill-steps") { Description = "Scale distillation steps (0 keeps the mean |delta| scales)", DefaultValueFactory = _ => 100 };
        var distillLr = new Option<float>("--distill-lr") { Description = "Scale distillation step, relative to each scale", DefaultValueFactory = _ => 0.02f };
        var calib = new Option<string>("--calib") { Description = "Calibration text: builtin:tasks | builtin:tasks=NAME | FILE.jsonl | FILE.txt", DefaultValueFactory = _ => "builtin:tasks" };
        var rounds = new Option<int>("--rounds") { Description = "Residual rounds (k sign matrices and k scales per weight)", DefaultValueFactory = _ => 1 };
        var compress = new Command("compress", "Compress a fine-tune to 1-bit deltas over its base (BitDelta), with scale distillation.");
        foreach (var opt in new Option[] { o.Device, o.Base, o.Finetuned, o.Out, distillSteps, distillLr, calib, rounds, o.BatchSize, o.SeqLen, o.Seed, o.Overwrite }) compress.Options.Add(opt);
        compress.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Base)!, r.GetValue(o.Finetuned)!, r.GetValue(o.Out)!, r.GetValue(distillSteps),
            r.GetValue(distillLr), r.GetValue(calib)!, r.GetValue(rounds), r.GetValue(o.BatchSize), r.GetValue(o.SeqLen), r.GetValue(o.Seed), r.GetValue(o.Overwrite), stdout));
        return compress;
    }

    private static int Run(string? deviceSpec, string baseDir, string fineDir, string outDir, int distillSteps, float distillLr, string calib, int rounds,
        int batchSize, int seqLen, int seed, bool overwrite, TextWriter stdout)
    {
        if (distillSteps < 0) throw new ArgumentException($"--distill-steps {distillSteps}: must be >= 0");
        if (distillLr <= 0) throw new ArgumentException($"--distill-lr {distillLr}: must be positive");
        if (rounds < 1) throw new ArgumentException($"--rounds {rounds}: must be at least 1");
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--base", baseDir), ("--finetuned", fineDir));
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        using var fine = HuggingFaceFolder.Load(fineDir, device, Host.Warn);
        var delta = BitDelta.Compress(baseModel, fine, rounds);
        var report = new DistillReport(double.NaN, double.NaN, 0, delta);
        if (baseModel.HasTokenizer)
        {
            var (train, eval) = Host.CalibrationBatches(baseModel.Tokenizer, calib, batchSize, seqLen, Math.Min(Math.Max(distillSteps, 1), 64), 4, seed);
            report = ScaleDistillation.Run(delta, baseModel, fine, train, eval, batchSize, distillSteps, distillLr);
        }
        else if (distillSteps > 0)
        {
            throw new NotSupportedException($"--distill-steps {distillSteps}: calibration text needs a tokenizer, and {baseDir} has no {HfTokenizer.JsonFile} or " +
                $"{HfTokenizer.SentencePieceFile} (vocab_size {baseModel.Config.VocabSize}). Use --distill-steps 0");
        }

        report.Delta.Save(outDir, baseModel.Config);
        stdout.WriteLine(Summary(baseModel, report));
        return 0;
    }

    internal static string Summary(LlamaModel baseModel, DistillReport report)
    {
        var d = report.Delta;
        long linearParams = d.Modules.Keys.Sum(m => (long)baseModel[m + ".weight"].Value.Length);
        double vsFp16 = linearParams * 2.0 / Math.Max(1, d.PackedBytes);
        double wholeFp16 = baseModel.ParameterCount * 2.0 / Math.Max(1, d.PackedBytes + d.DenseBytes);
        string distill = double.IsNaN(report.LogitMseBefore) ? "no calibration" : report.Steps == 0
            ? $"logit MSE {report.LogitMseBefore:E3} (no distillation)"
            : $"logit MSE {report.LogitMseBefore:E3} -> {report.LogitMseAfter:E3} after {report.Steps} distillation steps";
        return $"compressed {d.Modules.Count} linear weights to {d.Rounds} bit{(d.Rounds == 1 ? "" : "s")} per weight: {d.PackedBytes:N0} bytes, {vsFp16:F1}x smaller than fp16 linears; " +
            $"{d.Dense.Count} other tensors kept dense ({d.DenseBytes:N0} bytes); whole variant {wholeFp16:F1}x smaller than an fp16 copy; {distill}";
    }
}
