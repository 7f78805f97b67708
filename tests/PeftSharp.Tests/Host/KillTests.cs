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
            using var process = StartHost(Pretrain(outDir, resume));
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
        var leftovers = Directory.GetDirectories(outDir).Select(Path.GetFileName).Where(d => d != "checkpoint" && d!.StartsWith("checkpoint", StringComparison.Ordinal));
        Assert.That(leftovers, Is.Empty, "no temporary or old checkpoint left behind");
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int SendSignal(int pid, int signal);

    /// <summary>
    /// Ctrl-C (SIGINT) and SIGTERM stop a run at the next step boundary: exit code 130, a checkpoint of the finished
    /// steps, no final model, and the command that goes on printed; going on ends bit-identical to a run never stopped.
    /// </summary>
    [TestCase(2, TestName = "Pretrain_Sigint_CheckpointsSaysHowToResume_AndResumesExactly")]
    [TestCase(15, TestName = "Pretrain_Sigterm_CheckpointsSaysHowToResume_AndResumesExactly")]
    public void Pretrain_Signal_CheckpointsAndResumes(int signal)
    {
        Assume.That(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS(), "signals are sent through libc's kill");
        // 120 steps: the runtime's signal thread may wait for a core while the steps' workers hold both of a 2-core
        // machine's, and with 40 (tens of milliseconds on an AVX-512 machine) the run once finished before the handler ran.
        string[] Args(string outDir) => new[] { "pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "120", "--batch-size", "2", "--checkpoint-every", "0",
            "--out", outDir, "--quiet", "--device", "cpu", };

        string reference = Path.Combine(TempDir, "reference");
        var r = Peft.Run(Args(reference));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        string outDir = Path.Combine(TempDir, "stopped");
        using var process = StartHost(Args(outDir));
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var clock = Stopwatch.StartNew();
        string metrics = Path.Combine(outDir, "metrics.jsonl");
        while (!process.HasExited && StepsLogged(metrics) < 3 && clock.Elapsed < TimeSpan.FromSeconds(60)) Thread.Sleep(5);
        Assume.That(process.HasExited, Is.False, "the run was still going when the signal was due");
        Assert.That(SendSignal(process.Id, signal), Is.EqualTo(0));
        Assert.That(process.WaitForExit(60_000), Is.True, "the run stops after the step in flight");
        string err = stderr.Result;
        _ = stdout.Result;
        Assert.That(process.ExitCode, Is.EqualTo(PeftSharp.Trainer.Program.Interrupted), err);
        Assert.That(err, Does.Match(@"training interrupted after step \d+ of 120; checkpoint written to "));
        Assert.That(err, Does.Contain("to go on: peft pretrain").And.Contain($"--resume {Path.Combine(outDir, "checkpoint")}"));
        Assert.That(File.Exists(Path.Combine(outDir, "model.safetensors")), Is.False, "no final model from a stopped run");

        r = Peft.Run(Args(outDir).Concat(new[] { "--resume", Path.Combine(outDir, "checkpoint") }).ToArray());
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(outDir, "model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(reference, "model.safetensors"))),
            "stopped and resumed ends bit-identical to the uninterrupted run");
    }

    /// <summary>The `peft` host built beside the tests, as a child process with its output redirected (the caller drains it).</summary>
    private static Process StartHost(IEnumerable<string> args)
    {
        string peftDll = Path.Combine(AppContext.BaseDirectory, "peft.dll");
        Assume.That(File.Exists(peftDll), $"the host is built beside the tests ({peftDll})");
        var start = new ProcessStartInfo(DotnetHost.Path) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.ArgumentList.Add(peftDll);
        foreach (var a in args) start.ArgumentList.Add(a);
        return Process.Start(start)!;
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
