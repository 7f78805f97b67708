using System.CommandLine;
using System.Text.Json.Nodes;
using PeftSharp.Analysis;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft inspect`: spectra, intruder dimensions and condition numbers of a fine-tune (or an adapter or delta) against its base.</summary>
internal static class InspectCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var finetuned = new Option<string?>("--finetuned") { Description = "The fine-tuned model folder (or give --variant)" };
        var variant = new Option<string?>("--variant") { Description = "An adapter or delta folder (PEFT LoRA/DoRA/IA3/LN tuning, SSF, 1-bit, sparse), merged onto a copy of --base" };
        var top = new Option<int>("--top") { Description = "Singular values of each change to report", DefaultValueFactory = _ => 16 };
        var intruders = new Option<int>("--intruders") { Description = "Top singular vectors of each fine-tuned weight checked for intruders", DefaultValueFactory = _ => 10 };
        var threshold = new Option<double>("--threshold") { Description = "An intruder's largest |cosine| with the base's singular vectors is below this", DefaultValueFactory = _ => 0.5 };
        var svg = new Option<string?>("--svg") { Description = "Write the changes' spectra (sigma_i / sigma_1 per module kind) as an SVG picture" };
        var inspect = new Command("inspect", "Spectra, effective ranks, intruder dimensions and condition numbers of a fine-tune's weights against its base.");
        foreach (var opt in new Option[] { o.Device, o.Base, finetuned, variant, top, intruders, threshold, svg, o.Json }) inspect.Options.Add(opt);
        inspect.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(o.Base)!, r.GetValue(finetuned), r.GetValue(variant), r.GetValue(top), r.GetValue(intruders), r.GetValue(threshold),
            r.GetValue(svg), r.GetValue(o.Json), stdout));
        return inspect;
    }

    private static int Run(string? deviceSpec, string baseDir, string? fineDir, string? variantDir, int top, int intruders, double threshold, string? svg, bool json, TextWriter stdout)
    {
        if ((fineDir == null) == (variantDir == null)) throw new ArgumentException("inspect: give one of --finetuned or --variant");
        if (top < 1 || intruders < 1) throw new ArgumentException($"--top {top} and --intruders {intruders} must be at least 1");
        if (threshold is <= 0 or > 1) throw new ArgumentException($"--threshold {threshold}: must be in (0, 1]");
        using var device = Host.OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        using var fine = fineDir != null ? HuggingFaceFolder.Load(fineDir, device, Host.Warn) : HuggingFaceFolder.Load(baseDir, device, Host.Warn);
        if (variantDir != null) MergeRunner.ApplyFolder(fine, variantDir);
        var report = DeltaInspection.Inspect(baseModel, fine, top, intruders, threshold);
        if (svg != null) PeftSharp.Formats.AtomicFile.WriteText(svg, DeltaInspection.SpectraSvg(report, $"spectra of the change, {Path.GetFileName(Path.GetFullPath(fineDir ?? variantDir!))}"));
        if (json)
        {
            foreach (var t in report)
            {
                stdout.WriteLine(new JsonObject
                {
                    ["tensor"] = t.Name, ["shape"] = new JsonArray(t.Rows, t.Cols), ["delta_singular_values"] = new JsonArray(t.DeltaSpectrum.Select(v => (JsonNode)v).ToArray()),
                    ["delta_effective_rank"] = t.DeltaEffectiveRank, ["base_condition"] = Finite(t.BaseCondition), ["finetuned_condition"] = Finite(t.FineCondition),
                    ["intruder_similarities"] = new JsonArray(t.IntruderSimilarities.Select(v => (JsonNode)v).ToArray()), ["intruders"] = t.Intruders,
                }.ToJsonString());
            }

            return 0;
        }

        stdout.WriteLine($"{report.Count} linear weights; intruder = a top-{intruders} singular vector of the fine-tuned weight whose largest |cosine| with the base's is below {threshold}");
        foreach (var g in report.GroupBy(t => t.Name.Split('.')[^2]))
        {
            double baseCondition = Median(g.Select(t => t.BaseCondition)), fineCondition = Median(g.Select(t => t.FineCondition));
            stdout.WriteLine($"{g.Key,-10} change effective rank {g.Average(t => t.DeltaEffectiveRank),7:F1}, top sigma {g.Average(t => t.DeltaSpectrum[0]),9:G4}, " +
                $"intruders {g.Sum(t => t.Intruders),3} over {g.Count()} layers, condition base {baseCondition,9:G4} -> fine-tuned {fineCondition,9:G4}");
        }

        if (svg != null) stdout.WriteLine($"spectra written to {Path.GetFullPath(svg)}");
        return 0;
    }

    private static JsonNode? Finite(double v) => double.IsFinite(v) ? v : null;

    private static double Median(IEnumerable<double> values)
    {
        var s = values.OrderBy(v => v).ToList();
        return s.Count == 0 ? double.NaN : s[s.Count / 2];
    }
}
