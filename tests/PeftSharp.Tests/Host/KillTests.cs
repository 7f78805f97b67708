using System.Diagnostics;
using NUnit.Framework;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Host;

/// <summary>
/// The host as a real process, killed (SIGKILL, no chance to clean up) at seeded moments while it checkpoints every
/// step: each restart resumes from whatever the kill left, and the run ends bit-identical to one never interrupted,
/// its metrics holding each step once.
/// </summary>
public sealed class KillTests : TempDirectoryTest
{
    private const int Steps = 14;

    private static string[] Pretrain(string outDir, string? resume) =>
        new[] { "pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", $"{Steps}", "--batch-size", "2", "--checkpoint-every", "1", "--out", outDir, "--quiet",
            "--device", "cpu", }.Concat(resume == null ? Array.Empty<string>() : new[] { "--resume", resume }).ToArray();

    [Test]
    public void Pretrain_KilledRepeatedly_ResumesToTheUninterruptedResult()
    {
        string peftDll = Path.Combine(AppContext.BaseDirectory, "peft.dll");
        Assume.That(File.Exists(peftDll), $"the host is built beside the tests ({peftDll})");
        string dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet";

        string reference = Path.Combine(TempDir, "reference");
        var r = Peft.Run(Pretrain(reference, null));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        string outDir = Path.Combine(TempDir, "killed");
        string metrics = Path.Combine(outDir, "metrics.jsonl");
        var rng = new Random(17);
        int kills = 0;
        for (int attempt = 0; attempt < 4; attempt++)
        {
            string? resume = Directory.Exists(outDir) ? PeftSharp.Training.TrainingRun.LocateCheckpoint(Path.Combine(outDir, "checkpoint")) : null;
            int doneBefore = StepsLogged(metrics);
            var start = new ProcessStartInfo(dotnet) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            start.ArgumentList.Add(peftDll);
            foreach (var a in Pretrain(outDir, resume)) start.ArgumentList.Add(a);
            using var process = Process.Start(start)!;
            process.OutputDataReceived += (_, _) => { };
            process.ErrorDataReceived += (_, _) => { };
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
            // Kill a few steps past where this attempt began, after a seeded extra delay: inside a step, a metrics
            // line or a checkpoint swap, wherever that lands.
            int target = Math.Min(Steps - 1, doneBefore + 2 + rng.Next(3));
            var clock = Stopwatch.StartNew();
            while (!process.HasExited && StepsLogged(metrics) < target && clock.Elapsed < TimeSpan.FromSeconds(60)) Thread.Sleep(5);
            Thread.Sleep(rng.Next(0, 40));
            if (!process.HasExited)
            {
                process.Kill(entireProcessTree: true);
                kills++;
            }

            process.WaitForExit();
        }

        Assert.That(kills, Is.GreaterThan(0), "at least one run was killed before it finished");
        TestContext.Out.WriteLine($"{kills} kills; last checkpoint at step {StepsLogged(metrics)} logged");
        string? last = PeftSharp.Training.TrainingRun.LocateCheckpoint(Path.Combine(outDir, "checkpoint"));
        r = Peft.Run(Pretrain(outDir, last));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(outDir, "model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(reference, "model.safetensors"))),
            $"after {kills} kills the resumed run ends bit-identical to the uninterrupted one");
        var steps = File.ReadAllLines(metrics).Select(StepOf).Where(s => s > 0).ToArray();
        Assert.That(steps, Is.EqualTo(Enumerable.Range(1, Steps).ToArray()), "each step logged once, in order");
        Assert.That(Directory.GetDirectories(outDir).Select(Path.GetFileName).Where(d => d != "checkpoint" && d!.StartsWith("checkpoint", StringComparison.Ordinal)), Is.Empty, "no temporary or old checkpoint left behind");
    }

    private static int StepsLogged(string metrics)
    {
        if (!File.Exists(metrics)) return 0;
        try
        {
            using var stream = new FileStream(metrics, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var reader = new StreamReader(stream);
            return reader.ReadToEnd().Split('\n').Select(StepOf).DefaultIfEmpty(0).Max();
        }
        catch (IOException)
        {
            return 0;
        }
    }

    private static int StepOf(string line)
    {
        try
        {
            return System.Text.Json.Nodes.JsonNode.Parse(line)?["step"]?.GetValue<int>() ?? 0;
        }
        catch (System.Text.Json.JsonException)
        {
            return 0;
        }
    }
}
