using System.Text.Json.Nodes;
using NUnit.Framework;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Host;

/// <summary>Data as users bring it: text longer than a window, whole-file eval, explicit held-out splits, adapters scored beside the base.</summary>
public sealed class HostDataTests : TempDirectoryTest
{
    private static readonly string Paragraphs = string.Join("\n\n", Enumerable.Range(0, 12).Select(i =>
        $"Paragraph {i} is a good deal longer than the sixteen-token window it is trained in, so it spans several windows of the stream."));

    private string Pretrained(string data, params string[] extra)
    {
        string dir = Path.Combine(TempDir, "pre");
        var r = Peft.Run(new[] { "pretrain", "--data", data, "--config", "tiny", "--steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--out", dir,
            "--quiet", "--device", "cpu", }.Concat(extra).ToArray());
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        return dir;
    }

    [Test]
    public void TextFile_LongerThanTheWindow_TrainsInWindows_SplitIsExplicit_EvalScoresAllOfIt()
    {
        string text = Path.Combine(TempDir, "notes.txt");
        File.WriteAllText(text, Paragraphs);
        string dir = Path.Combine(TempDir, "pre");
        var r = Peft.Run("pretrain", "--data", text, "--config", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "0", "--out", dir,
            "--quiet", "--device", "cpu", "--eval-split", "0.25");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        int windows = (Paragraphs.Length + 2 - 1 + 15) / 16; // [BOS] bytes [EOS], one id of overlap per window
        int held = (int)Math.Round(0.25 * windows);
        Assert.That(r.Out, Does.Contain($"{windows - held} windows of 16 tokens trained on, {held} held out (--eval-split 0.25)"));
        Assert.That(r.Out, Does.Contain("held-out: loss").And.Contain($"{held} windows (no prompts, so no exact match)"));

        r = Peft.Run("eval", "--model", dir, "--data", text, "--seq-len", "16", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("loss on every token").And.Contain($"{windows} windows"), "eval scores the whole file");
    }

    [Test]
    public void Eval_ScoresTheWholeFile_TrainingHoldsNothingOutUnlessAsked()
    {
        string jsonl = Path.Combine(TempDir, "five.jsonl");
        File.WriteAllLines(jsonl, Enumerable.Range(0, 5).Select(i => $"{{\"prompt\": \"reverse ab{i}=\", \"completion\": \"{i}ba\"}}"));
        string pre = Pretrained("builtin:tasks");
        var r = Peft.Run("eval", "--model", pre, "--data", jsonl, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("exact match").And.Contain("of 5"), "all five lines are scored");

        string fine = Path.Combine(TempDir, "fine");
        r = Peft.Run("finetune", "--model", pre, "--data", jsonl, "--steps", "2", "--batch-size", "2", "--out", fine, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("5 examples, all trained on; none held out (--eval-split 0.1 or --eval-data FILE to score)"));
        Assert.That(r.Out, Does.Not.Contain("held-out: loss"));
        r = Peft.Run("finetune", "--model", pre, "--data", jsonl, "--steps", "2", "--batch-size", "2", "--out", fine, "--quiet", "--device", "cpu", "--eval-data", jsonl,
            "--overwrite");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain($"scored on {jsonl} (5)").And.Contain("held-out: loss").And.Contain("of 5"));

        foreach (var (args, expected) in new[]
        {
            (new[] { "--data", "builtin:tasks", "--eval-split", "0.1" }, "--eval-split applies to data files"),
            (new[] { "--data", jsonl, "--eval-split", "0.2", "--eval-data", jsonl }, "give one"),
            (new[] { "--data", jsonl, "--eval-split", "1.5" }, "--eval-split 1.5: must be in (0, 1)"),
            (new[] { "--data", jsonl, "--eval-data", Path.Combine(TempDir, "absent.jsonl") }, "--eval-data"),
        })
        {
            r = Peft.Run(new[] { "finetune", "--model", pre, "--steps", "1", "--out", fine, "--quiet", "--device", "cpu", "--overwrite" }.Concat(args).ToArray());
            Assert.That(r.Code, Is.EqualTo(2), string.Join(" ", args));
            Assert.That(r.Err, Does.Contain(expected), string.Join(" ", args));
        }
    }

    [Test]
    public void Eval_WithAdapters_OneRowPerVariant_AsJson()
    {
        string pre = Pretrained("builtin:tasks");
        string lora = Path.Combine(TempDir, "lora");
        var r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "lora", "--rank", "2", "--steps", "3", "--batch-size", "2", "--lr", "0.05",
            "--checkpoint-every", "0", "--out", lora, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "6", "--adapter", $"rev={lora}", "--device", "cpu", "--json");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var rows = r.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonNode.Parse(l)!).ToList();
        Assert.That(rows.Select(x => (string)x["variant"]!), Is.EqualTo(new[] { "base", "rev" }));
        Assert.That(rows.Select(x => (int)x["examples"]!), Is.All.EqualTo(6));
        Assert.That((double)rows[1]["loss"]!, Is.Not.EqualTo((double)rows[0]["loss"]!).Within(1e-6), "the adapter's row is scored through the adapter");

        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--delta", lora, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("--delta").And.Contain("PeftLoraAdapter"));
    }

    /// <summary>Nothing is overwritten by surprise, flags that would do nothing are refused, resume continues only the run it checkpointed.</summary>
    [Test]
    public void Guards_Overwrite_IdleFlags_Ranges_AndResumeMismatch()
    {
        string pre = Pretrained("builtin:tasks");
        string file = Path.Combine(TempDir, "a-file");
        File.WriteAllText(file, "x");
        foreach (var (args, expected) in new (string[], string)[]
        {
            (new[] { "pretrain", "--steps", "1", "--out", pre }, $"--out {pre} already holds model.safetensors; pass --overwrite"),
            (new[] { "finetune", "--model", pre, "--steps", "1", "--out", pre, "--overwrite" }, "is also --model"),
            (new[] { "finetune", "--model", pre, "--steps", "1", "--out", file }, "is a file"),
            (new[] { "finetune", "--model", pre, "--method", "full", "--dora", "--rank", "4", "--out", file }, "--rank, --dora apply to --method lora, not --method full"),
            (new[] { "finetune", "--model", pre, "--method", "lora", "--density", "0.1", "--out", file }, "--density applies to --method sparse"),
            (new[] { "finetune", "--model", pre, "--momentum", "0.5", "--out", file }, "--momentum applies to --optimizer sgd"),
            (new[] { "finetune", "--model", pre, "--method", "lora", "--rank", "100", "--steps", "1", "--out", Path.Combine(TempDir, "r") }, "--rank 100: larger than"),
            (new[] { "generate", "--model", pre, "--prompt", "x", "--top-k", "-1" }, "--top-k -1"),
            (new[] { "merge", "--model", pre, "--adapter", pre, "--out", pre }, "is also --model"),
            (new[] { "compress", "--base", pre, "--finetuned", pre, "--calib", "builtin:nope", "--out", Path.Combine(TempDir, "c") }, "--calib builtin:nope"),
        })
        {
            var r = Peft.Run(args.Concat(args[0] is "generate" or "merge" or "compress" ? new[] { "--device", "cpu" } : new[] { "--device", "cpu", "--quiet" }).ToArray());
            Assert.That(r.Code, Is.EqualTo(2), string.Join(" ", args) + r.Err);
            Assert.That(r.Err, Does.Contain(expected), string.Join(" ", args));
        }

        // --overwrite replaces; a resume with other settings is refused naming them; a resume with nothing left says so.
        string run = Path.Combine(TempDir, "run");
        string[] Train(params string[] extra) => new[] { "finetune", "--model", pre, "--checkpoint-every", "2", "--out", run, "--quiet", "--device", "cpu", }
            .Concat(extra.Contains("--data") ? Array.Empty<string>() : new[] { "--data", "builtin:tasks=copy", "--batch-size", "2" })
            .Concat(extra.Contains("--steps") ? Array.Empty<string>() : new[] { "--steps", "4" }).Concat(extra).ToArray();
        Assert.That(Peft.Run(Train()).Code, Is.EqualTo(0));
        Assert.That(Peft.Run(Train()).Err, Does.Contain("already holds"));
        Assert.That(Peft.Run(Train("--overwrite")).Code, Is.EqualTo(0));
        string ckpt = Path.Combine(run, "checkpoint");
        var mismatch = Peft.Run(Train("--resume", ckpt, "--batch-size", "3", "--data", "builtin:tasks=sort"));
        Assert.That(mismatch.Code, Is.EqualTo(2), mismatch.Err);
        Assert.That(mismatch.Err, Does.Contain("differs from the one that wrote the checkpoint").And.Contain("batch_size was 2, now 3")
            .And.Contain("data was builtin:tasks=copy, now builtin:tasks=sort"));
        var done = Peft.Run(Train("--resume", ckpt));
        Assert.That(done.Code, Is.EqualTo(0), done.Err);
        Assert.That(done.Out, Does.Contain("the checkpoint is at step 4 of --steps 4: nothing left to train"));
        var longer = Peft.Run(Train("--resume", ckpt, "--steps", "6"));
        Assert.That(longer.Code, Is.EqualTo(0), "a longer continuation of the same run is allowed: " + longer.Err);
    }
}
