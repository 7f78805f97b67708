using System.CommandLine;
using PeftSharp.Compression;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Trainer.Commands;

/// <summary>
/// `peft compress`: a fine-tune to 1-bit deltas over its base (BitDelta), with scale distillation; or with
/// `--method compeft` to a ternary sparse delta (ComPEFT: top-k by magnitude, signs, one scale per tensor), `--method
/// delta-come` to mixed-precision SVD factors; `--method lord` factors one model's own weights (LoRD).
/// </summary>
internal static class CompressCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var distillSteps = new Option<int>("--distill-steps") { Description = "Scale distillation steps (0 keeps the mean |delta| scales)", DefaultValueFactory = _ => 100 };
        var distillLr = new Option<float>("--distill-lr") { Description = "Scale distillation step, relative to each scale", DefaultValueFactory = _ => 0.02f };
        var calib = new Option<string>("--calib") { Description = "Calibration text: builtin:tasks | builtin:tasks=NAME | FILE.jsonl | FILE.txt", DefaultValueFactory = _ => "builtin:tasks" };
        var rounds = new Option<int>("--rounds") { Description = "Residual rounds (k sign matrices and k scales per weight)", DefaultValueFactory = _ => 1 };
        var method = new Option<string>("--method")
        {
            Description = "bitdelta (1-bit signs, distilled scales) | compeft (top-k signs, one scale per tensor) | delta-come (mixed-precision SVD, a PEFT LoRA folder) | " +
                "lord (low-rank factors of a model's own weights)",
            DefaultValueFactory = _ => "bitdelta",
        };
        var rank = new Option<int>("--rank") { Description = "Delta-CoMe, LoRD: singular triplets kept per weight", DefaultValueFactory = _ => 16 };
        var rankRatio = new Option<double>("--rank-ratio") { Description = "LoRD: fraction of each weight's full rank kept (instead of --rank)" };
        // LoRD compresses one model (--model); the delta methods a fine-tune against its base (--base, --finetuned).
        var model = new Option<string>("--model") { Description = "LoRD: the model folder to compress" };
        var baseDir = new Option<string>("--base") { Description = o.Base.Description };
        var fineDir = new Option<string>("--finetuned") { Description = o.Finetuned.Description };
        var density = new Option<double>("--density") { Description = "ComPEFT: fraction of each tensor's entries kept", DefaultValueFactory = _ => 0.1 };
        var alpha = new Option<float>("--alpha") { Description = "ComPEFT: multiple of the kept entries' mean |delta| used as their magnitude", DefaultValueFactory = _ => 1f };
        var compress = new Command("compress", "Compress a fine-tune to 1-bit deltas over its base (BitDelta, with scale distillation), to a ternary sparse delta (ComPEFT) or to " +
            "mixed-precision SVD factors (Delta-CoMe); or a model's own weights to low-rank factors (LoRD).");
        foreach (var opt in new Option[] { o.Device, baseDir, fineDir, model, o.Out, method, distillSteps, distillLr, calib, rounds, density, alpha, rank, rankRatio, o.BatchSize,
            o.SeqLen, o.Seed, o.Overwrite })
        {
            compress.Options.Add(opt);
        }

        compress.SetAction(r =>
        {
            string m = r.GetValue(method)!;
            var given = new Option[] { distillSteps, distillLr, calib, rounds, density, alpha, rank, rankRatio, model, baseDir, fineDir }
                .Where(f => r.GetResult(f) is { Implicit: false }).Select(f => f.Name).ToList();
            var wrong = given.Where(f => m switch
            {
                "compeft" => f is not ("--density" or "--alpha" or "--base" or "--finetuned"),
                "delta-come" => f is not ("--rank" or "--base" or "--finetuned"),
                "lord" => f is not ("--rank" or "--rank-ratio" or "--model"),
                _ => f is "--density" or "--alpha" or "--rank" or "--rank-ratio" or "--model",
            }).ToList();
            if (m is not ("bitdelta" or "compeft" or "delta-come" or "lord")) throw new ArgumentException($"--method {m}: use bitdelta, compeft, delta-come or lord");
            if (wrong.Count > 0)
            {
                throw new ArgumentException($"{string.Join(", ", wrong)} {(wrong.Count == 1 ? "does" : "do")} not apply to --method {m}: {(wrong.Count == 1 ? "it" : "they")} would do nothing");
            }

            if (m == "lord")
            {
                if (!given.Contains("--model")) throw new ArgumentException("--method lord compresses one model: give --model DIR");
                if (given.Contains("--rank") == given.Contains("--rank-ratio")) throw new ArgumentException("--method lord: give exactly one of --rank and --rank-ratio");
                return RunLord(r.GetValue(o.Device), r.GetValue(model)!, r.GetValue(o.Out)!, given.Contains("--rank-ratio") ? r.GetValue(rankRatio) : null,
                    given.Contains("--rank") ? r.GetValue(rank) : null, r.GetValue(o.Overwrite), stdout);
            }

            var missing = new[] { baseDir, fineDir }.Where(f => !given.Contains(f.Name)).Select(f => f.Name).ToList();
            if (missing.Count > 0) throw new ArgumentException($"--method {m} compresses a fine-tune against its base: give {string.Join(" and ", missing)}");
            var o2 = (Base: baseDir, Finetuned: fineDir);
            if (m == "delta-come") return RunDeltaCoMe(r.GetValue(o.Device), r.GetValue(o2.Base)!, r.GetValue(o2.Finetuned)!, r.GetValue(o.Out)!, r.GetValue(rank), r.GetValue(o.Overwrite), stdout);
            return m == "compeft"
                ? RunComPeft(r.GetValue(o.Device), r.GetValue(o2.Base)!, r.GetValue(o2.Finetuned)!, r.GetValue(o.Out)!, r.GetValue(density), r.GetValue(alpha), r.GetValue(o.Overwrite), stdout)
                : Run(r.GetValue(o.Device), r.GetValue(o2.Base)!, r.GetValue(o2.Finetuned)!, r.GetValue(o.Out)!, r.GetValue(distillSteps), r.GetValue(distillLr), r.GetValue(calib)!,
                    r.GetValue(rounds), r.GetValue(o.BatchSize), r.GetValue(o.SeqLen), r.GetValue(o.Seed), r.GetValue(o.Overwrite), stdout);
        });
        return compress;
    }

    private static int RunComPeft(string? deviceSpec, string baseDir, string fineDir, string outDir, double density, float alpha, bool overwrite, TextWriter stdout)
    {
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--base", baseDir), ("--finetuned", fineDir));
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        using var fine = HuggingFaceFolder.Load(fineDir, device, Host.Warn);
        var delta = ComPeft.Compress(baseModel, fine, density, alpha);
        delta.Save(outDir, baseModel.Config);
        stdout.WriteLine(ComPeftSummary(baseModel, delta, density));
        return 0;
    }

    private static int RunDeltaCoMe(string? deviceSpec, string baseDir, string fineDir, string outDir, int rank, bool overwrite, TextWriter stdout)
    {
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--base", baseDir), ("--finetuned", fineDir));
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        using var fine = HuggingFaceFolder.Load(fineDir, device, Host.Warn);
        var (adapter, bytes) = DeltaCoMe.Compress(baseModel, fine, rank);
        // The adapter names its base as the folder it was compressed against.
        new PeftLoraAdapter(adapter.Config with { BaseModelNameOrPath = Path.GetFullPath(baseDir) }, adapter.Modules, null, adapter.Saved).Save(outDir, baseModel.Config);
        long fp16 = adapter.Modules.Keys.Sum(m => (long)baseModel[m + ".weight"].Value.Length) * 2;
        stdout.WriteLine($"Delta-CoMe: {adapter.Modules.Count} linear changes as rank-{rank} factors, singular vectors at 8 / 4 / 2 bits by singular value, " +
            $"{adapter.Saved.Count} other tensors whole; mixed-precision payload {bytes:N0} bytes, {fp16 / (double)Math.Max(1, bytes):F1}x smaller than the fp16 linear changes; " +
            "written as a PEFT LoRA folder (dequantized factors)");
        return 0;
    }

    private static int RunLord(string? deviceSpec, string modelDir, string outDir, double? rankRatio, int? rank, bool overwrite, TextWriter stdout)
    {
        Host.CheckOutput(outDir, overwrite, resuming: false, ("--model", modelDir));
        using var device = Host.OpenDevice(deviceSpec);
        using var model = HuggingFaceFolder.Load(modelDir, device, Host.Warn);
        var lord = LordModel.Compress(model, rankRatio, rank);
        if (overwrite) Host.RemoveDenseWeights(outDir);
        lord.Save(outDir, model);
        Host.CopyModelExtras(modelDir, outDir);
        stdout.WriteLine(LordSummary(model, lord));
        return 0;
    }

    internal static string LordSummary(LlamaModel model, LordModel lord)
    {
        int linear = LoraAdapterConfig.LlamaLinearModules(model.Config).Count();
        string ranks = string.Join(", ", lord.Factors.Values.GroupBy(f => f.Rank).OrderBy(g => g.Key).Select(g => $"{g.Count()} at rank {g.Key}"));
        return $"LoRD: {lord.Factors.Count} of {linear} linear weights as low-rank factors ({(ranks.Length > 0 ? ranks : "none")}; a weight whose factors would not be smaller stays dense); " +
            $"{lord.Parameters:N0} parameters against {model.ParameterCount:N0} ({100.0 * lord.Parameters / model.ParameterCount:F1}%)";
    }

    internal static string ComPeftSummary(LlamaModel baseModel, PeftSharp.Variants.SparseDelta delta, double density)
    {
        long ternary = ComPeft.TernaryBytes(delta, density);
        long changed = delta.Entries.Keys.Sum(n => (long)baseModel[n].Value.Length);
        return $"ComPEFT: {delta.Nonzeros:N0} of {changed:N0} entries of {delta.Entries.Count} tensors kept as sign x one scale per tensor ({100 * density:G3}%); ternary payload " +
            $"{ternary:N0} bytes, {changed * 2.0 / Math.Max(1, ternary):F1}x smaller than the fp16 task vector (stored as a sparse-delta folder: {delta.Nonzeros * 8:N0} bytes)";
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
