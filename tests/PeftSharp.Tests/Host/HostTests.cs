using NUnit.Framework;

namespace PeftSharp.Tests.Host;

public sealed class HostTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PeftSharp.Trainer.Program.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    [Test]
    public void Devices_ListsCpuAndAutoChoice()
    {
        var (code, output, _) = Run("devices");
        Assert.That(code, Is.EqualTo(0));
        Assert.That(output, Does.Contain("cpu").And.Contain("auto picks"));
    }

    [Test]
    public void SelfCheck_OnCpu_AllOpsPass()
    {
        var (code, output, err) = Run("selfcheck", "--device", "cpu");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(output, Does.Contain("matmul").And.Contain("attention").And.Not.Contain("FAILED"));
    }

    [Test]
    public void BadFlagOrDevice_OneLineErrorAndNonZeroExit()
    {
        var (code, _, err) = Run("selfcheck", "--devise", "cpu");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err, Does.Contain("--devise"));
        (code, _, err) = Run("selfcheck", "--device", "quantum");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(err, Does.Contain("quantum"));
    }
}

public sealed class HostJobTests
{
    private string dir = null!;

    [SetUp]
    public void MakeDir() => dir = Directory.CreateTempSubdirectory("peftsharp-host-").FullName;

    [TearDown]
    public void RemoveDir() => Directory.Delete(dir, recursive: true);

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PeftSharp.Trainer.Program.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }

    [Test]
    public void PretrainEvalGenerateLogitsFinetuneResume_EndToEnd()
    {
        string pre = Path.Combine(dir, "pre");
        var r = Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "4", "--checkpoint-every", "3", "--out", pre, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.Exists(Path.Combine(pre, "model.safetensors")) && File.Exists(Path.Combine(pre, "config.json")) && File.Exists(Path.Combine(pre, "loss.svg")));
        Assert.That(File.ReadAllLines(Path.Combine(pre, "metrics.jsonl")), Has.Length.EqualTo(6));
        Assert.That(r.Out, Does.Contain("held-out"));

        r = Run("eval", "--model", pre, "--data", "builtin:tasks=add", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("perplexity").And.Contain("exact match"));

        r = Run("generate", "--model", pre, "--prompt", "copy ab=", "--max-tokens", "4", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        File.WriteAllText(Path.Combine(pre, "generation_config.json"), "{\"do_sample\": true, \"temperature\": 0.7, \"top_k\": 5, \"max_new_tokens\": 3}");
        r = Run("generate", "--model", pre, "--prompt", "add 1+1=", "--seed", "4", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out.TrimEnd('\n').Length, Is.LessThanOrEqualTo(3 * 4), "max_new_tokens from generation_config.json bounds the output");

        r = Run("logits", "--model", pre, "--tokens", "256,99,111", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var logits = System.Text.Json.JsonSerializer.Deserialize<float[]>(r.Out)!;
        Assert.That(logits, Has.Length.EqualTo(259));

        string fine = Path.Combine(dir, "fine");
        r = Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "full", "--steps", "4", "--batch-size", "4", "--out", fine, "--quiet", "--device", "cpu",
            "--freeze", "model.embed_tokens.*", "--layer-decay", "0.8", "--ema", "0.9", "--grad-accum", "2", "--clip-per-parameter");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("froze 1 parameter tensors"));
        string sgd = Path.Combine(dir, "sgd");
        r = Run("finetune", "--model", pre, "--data", "builtin:tasks=add", "--optimizer", "sgd", "--steps", "2", "--batch-size", "2", "--out", sgd, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        // Resume the pre-training run from its step-3 checkpoint to step 6: same final weights as the uninterrupted run.
        string resumed = Path.Combine(dir, "resumed");
        r = Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "4", "--checkpoint-every", "0", "--out", resumed, "--quiet", "--device", "cpu",
            "--resume", Path.Combine(pre, "checkpoint"));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(resumed, "model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(pre, "model.safetensors"))),
            "resumed run ends bit-identical to the uninterrupted one");
    }

    private string OtherVocabModel()
    {
        string m = Path.Combine(dir, "vocab300");
        Directory.CreateDirectory(m);
        File.WriteAllText(Path.Combine(m, "config.json"), (PeftSharp.Model.LlamaConfig.Tiny with { VocabSize = 300 }).ToJson());
        return m;
    }

    [Test]
    public void BadValues_OneLineErrorsNamingTheFlag()
    {
        foreach (var (args, expected) in new (string[], string)[]
        {
            (new[] { "pretrain", "--steps", "0", "--out", dir }, "--steps 0"),
            (new[] { "pretrain", "--data", "builtin:puzzles", "--out", dir, "--steps", "1" }, "builtin:puzzles"),
            (new[] { "pretrain", "--data", "/no/such/file.jsonl", "--out", dir, "--steps", "1" }, "/no/such/file.jsonl"),
            (new[] { "finetune", "--model", dir, "--method", "lora", "--out", dir }, "--method lora"),
            (new[] { "eval", "--model", Path.Combine(dir, "missing") }, "config.json"),
            (new[] { "logits", "--model", dir, "--tokens", "1,x" }, "'x'"),
            (new[] { "pretrain", "--out", dir, "--config", "huge" }, "--config huge"),
            (new[] { "pretrain", "--out", dir, "--steps", "1", "--freeze", "*.nothing.*" }, "*.nothing.*"),
            (new[] { "pretrain", "--out", dir, "--steps", "1", "--optimizer", "lion" }, "--optimizer lion"),
            (new[] { "eval", "--model", OtherVocabModel() }, "vocab_size 300"),
        })
        {
            var (code, _, err) = Run(args);
            Assert.That(code, Is.EqualTo(2), string.Join(" ", args));
            Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1), err);
            Assert.That(err, Does.Contain(expected), string.Join(" ", args));
        }
    }
}
