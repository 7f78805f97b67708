using NUnit.Framework;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Host;

/// <summary>Runs the `peft` host in-process and captures its output.</summary>
internal static class Peft
{
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PeftSharp.Trainer.Program.Run(args, stdout, stderr);
        return (code, stdout.ToString(), stderr.ToString());
    }
}

public sealed class HostTests
{
    [Test]
    public void Devices_ListsCpuAndAutoChoice()
    {
        var (code, output, _) = Peft.Run("devices");
        Assert.That(code, Is.EqualTo(0));
        Assert.That(output, Does.Contain("cpu").And.Contain("auto picks"));
    }

    [Test]
    public void DevicesAndSelfCheck_AsJson()
    {
        var (code, output, err) = Peft.Run("devices", "--json");
        Assert.That(code, Is.EqualTo(0), err);
        var doc = System.Text.Json.Nodes.JsonNode.Parse(output)!;
        Assert.That(doc["devices"]!.AsArray().Select(d => (string)d!["spec"]!), Does.Contain("cpu"));
        Assert.That((string)doc["auto"]!, Is.Not.Empty);
        (code, output, err) = Peft.Run("selfcheck", "--device", "cpu", "--json");
        Assert.That(code, Is.EqualTo(0), err);
        var rows = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!).ToList();
        Assert.That(rows, Is.Not.Empty);
        Assert.That(rows.All(r => (bool)r["passed"]! && (string)r["device"]! == "cpu" && (double)r["max_error"]! <= (double)r["tolerance"]!), Is.True);
        Assert.That(rows.Select(r => (string)r["op"]!), Does.Contain("matmul"));
    }

    /// <summary>PeftSharp refusing a combination is the user's to fix (exit 2, one line); the runtime's own InvalidOperationException is a bug (exit 1, stack trace).</summary>
    [Test]
    public void InvalidOperation_FromPeftSharpIsBadInput_FromTheRuntimeIsABug()
    {
        using var device = new PeftSharp.Engine.Cpu.CpuDevice();
        using var model = PeftSharp.Model.LlamaModel.Create(device, PeftSharp.Model.LlamaConfig.Tiny, seed: 1);
        model.AddPrefixTuning(2, seed: 1);
        var ours = Assert.Throws<InvalidOperationException>(() => model.AddPrefixTuning(2, seed: 1))!;
        var err = new StringWriter();
        Assert.That(PeftSharp.Trainer.Program.Report(ours, err), Is.EqualTo(PeftSharp.Trainer.Program.BadInput));
        Assert.That(err.ToString().Trim().Split('\n'), Has.Length.EqualTo(1));
        var runtime = Assert.Throws<InvalidOperationException>(() => Array.Empty<int>().First())!;
        err = new StringWriter();
        Assert.That(PeftSharp.Trainer.Program.Report(runtime, err), Is.EqualTo(PeftSharp.Trainer.Program.InternalError));
        Assert.That(err.ToString(), Does.Contain("internal error").And.Contain("at "));
    }

    [Test]
    public void SelfCheck_OnCpu_AllOpsPass()
    {
        var (code, output, err) = Peft.Run("selfcheck", "--device", "cpu");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(output, Does.Contain("matmul").And.Contain("attention").And.Not.Contain("FAILED"));
    }

    [Test]
    public void BadFlagOrDevice_OneLineErrorAndNonZeroExit()
    {
        var (code, _, err) = Peft.Run("selfcheck", "--devise", "cpu");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err, Does.Contain("--devise").And.Contain("(did you mean --device?)"));
        (code, _, err) = Peft.Run("finetune", "--model", "m", "--out", "o", "--virtual-token", "4");
        Assert.That(err, Does.Contain("(did you mean --virtual-tokens?)"));
        (code, _, err) = Peft.Run("eval", "--model", "m", "--zzzzzzzz");
        Assert.That(err, Does.Not.Contain("did you mean"), "no suggestion when nothing is near");
        (code, _, err) = Peft.Run("selfcheck", "--device", "quantum");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(err, Does.Contain("quantum"));
    }
}

public sealed class HostJobTests : TempDirectoryTest
{

    [Test]
    public void PretrainEvalGenerateLogitsFinetuneResume_EndToEnd()
    {
        string pre = Path.Combine(TempDir, "pre");
        var r = Peft.Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "4", "--checkpoint-every", "3", "--out", pre, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.Exists(Path.Combine(pre, "model.safetensors")) && File.Exists(Path.Combine(pre, "config.json")) && File.Exists(Path.Combine(pre, "loss.svg")));
        Assert.That(File.ReadAllLines(Path.Combine(pre, "metrics.jsonl")), Has.Length.EqualTo(6));
        Assert.That(r.Out, Does.Contain("held-out"));

        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=add", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("perplexity").And.Contain("exact match"));
        // Task examples are scored on their completions (as fine-tuning trains them): the printed loss is the
        // completion loss of the first 64 held-out 'add' examples at the default seed (1) and sequence length (40).
        Assert.That(r.Out, Does.Contain("loss on completions"));
        using (var device = new PeftSharp.Engine.Cpu.CpuDevice())
        using (var model = PeftSharp.Formats.HuggingFaceFolder.Load(pre, device))
        {
            var held = PeftSharp.Data.TaskSuite.Stream(new[] { "add" }, 1 + 1000, PeftSharp.Data.Split.HeldOut).Take(64).ToList();
            var expected = PeftSharp.Training.Evaluator.Evaluate(model, held, 40, completionOnly: true);
            Assert.That(r.Out, Does.Contain($"loss {expected.Loss:F4}"), $"completion loss {expected.Loss:F4}");
        }

        r = Peft.Run("generate", "--model", pre, "--prompt", "copy ab=", "--max-tokens", "4", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        File.WriteAllText(Path.Combine(pre, "generation_config.json"), "{\"do_sample\": true, \"temperature\": 0.7, \"top_k\": 5, \"max_new_tokens\": 3}");
        r = Peft.Run("generate", "--model", pre, "--prompt", "add 1+1=", "--seed", "4", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out.TrimEnd('\n').Length, Is.LessThanOrEqualTo(3 * 4), "max_new_tokens from generation_config.json bounds the output");

        r = Peft.Run("logits", "--model", pre, "--tokens", "256,99,111", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var logits = System.Text.Json.JsonSerializer.Deserialize<float[]>(r.Out)!;
        Assert.That(logits, Has.Length.EqualTo(259));

        string fine = Path.Combine(TempDir, "fine");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "full", "--steps", "4", "--batch-size", "4", "--out", fine, "--quiet", "--device", "cpu",
            "--freeze", "model.embed_tokens.*", "--layer-decay", "0.8", "--ema", "0.9", "--grad-accum", "2", "--clip-per-parameter");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("froze 1 parameter tensors"));
        string lora = Path.Combine(TempDir, "lora");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "lora", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
            "--steps", "3", "--batch-size", "2", "--out", lora, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("trainable parameters"));
        Assert.That(File.Exists(Path.Combine(lora, "adapter_config.json")) && File.Exists(Path.Combine(lora, "adapter_model.safetensors")));
        r = Peft.Run("merge", "--model", pre, "--adapter", lora, "--out", Path.Combine(TempDir, "lora-merged"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        // The LoRA family's flags, each for a couple of steps: DoRA, B only with dropout, LoRA-GA (rank-2r export),
        // chain of LoRA (saves the merged model), and resuming adapter training from its checkpoint.
        foreach (var (name, extra, expect) in new[]
        {
            ("dora", new[] { "--dora" }, "DoRA r = 4"),
            ("bonly", new[] { "--b-only", "--dropout", "0.1" }, "B only, dropout 0.1"),
            ("ga", new[] { "--init", "lora-ga" }, "LoRA-GA init"),
            ("chain", new[] { "--chain-every", "2" }, "chained every 2 steps"),
            ("dora-dropout", new[] { "--dora", "--dropout", "0.1" }, "DoRA r = 4, alpha = 16, dropout 0.1"),
            ("lora-bias", new[] { "--lora-bias" }, "LoRA r = 4, alpha = 16, lora_bias"),
        })
        {
            string dir = Path.Combine(TempDir, name);
            r = Peft.Run(new[] { "finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "lora", "--rank", "4", "--steps", "4", "--batch-size", "2",
                "--checkpoint-every", "2", "--out", dir, "--quiet", "--device", "cpu" }.Concat(extra).ToArray());
            Assert.That(r.Code, Is.EqualTo(0), $"{name}: {r.Err}");
            Assert.That(r.Out, Does.Contain(expect), name);
            Assert.That(File.Exists(Path.Combine(dir, name == "chain" ? "model.safetensors" : "adapter_model.safetensors")), name);
        }

        Assert.That(PeftSharp.Formats.PeftLoraAdapter.ParseConfig(File.ReadAllText(Path.Combine(TempDir, "ga", "adapter_config.json")), "ga").R, Is.EqualTo(8), "LoRA-GA exports rank 2r");
        // A lora_bias adapter writes PEFT's lora_bias and is scored unmerged (Llama's modules have no bias to merge into).
        Assert.That(PeftSharp.Formats.PeftLoraAdapter.ParseConfig(File.ReadAllText(Path.Combine(TempDir, "lora-bias", "adapter_config.json")), "b").LoraBias, Is.True);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"biased={Path.Combine(TempDir, "lora-bias")}", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("biased"));
        r = Peft.Run("merge", "--model", pre, "--adapter", Path.Combine(TempDir, "lora-bias"), "--out", Path.Combine(TempDir, "bias-merged"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2), r.Err);
        Assert.That(r.Err, Does.Contain("lora_bias").And.Contain("no bias to merge"), "merging into bias-less modules is refused, as PEFT refuses it");

        // IA3 writes a PEFT IA3 folder that eval scores unmerged and merge folds in.
        string ia3 = Path.Combine(TempDir, "ia3");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "ia3", "--steps", "2", "--batch-size", "2", "--out", ia3, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("IA3 on 6 modules"));
        Assert.That(File.ReadAllText(Path.Combine(ia3, "adapter_config.json")), Does.Contain("\"peft_type\": \"IA3\""));
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"ia3={ia3}", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("ia3:")), Is.EqualTo((0, true)), r.Err);
        r = Peft.Run("merge", "--model", pre, "--adapter", ia3, "--out", Path.Combine(TempDir, "ia3-merged"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("IA3 vectors"));

        // LN tuning writes a PEFT LN_TUNING folder, scored unmerged.
        string lnDir = Path.Combine(TempDir, "ln");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "ln-tuning", "--steps", "2", "--batch-size", "2", "--out", lnDir, "--quiet", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("LN tuning: 5 norm weights train")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"ln={lnDir}", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("ln:")), Is.EqualTo((0, true)), r.Err);

        // inspect measures the LoRA adapter's change per weight, as JSON lines and a spectra picture.
        r = Peft.Run("inspect", "--base", pre, "--variant", lora, "--json", "--svg", Path.Combine(TempDir, "spectra.svg"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var lines = r.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        var tensors = lines.Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!["tensor"]!.GetValue<string>()).ToList();
        Assert.That((tensors.Count, tensors.All(t => t.EndsWith("_proj.weight", StringComparison.Ordinal))), Is.EqualTo((14, true)), "one line per linear weight");
        Assert.That(File.ReadAllText(Path.Combine(TempDir, "spectra.svg")), Does.StartWith("<svg"));
        r = Peft.Run("inspect", "--base", pre, "--variant", lora, "--tuco", "--data", "builtin:tasks=reverse,add", "--examples", "6", "--json", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var tucos = r.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!["tuco"]!.GetValue<double>()).ToList();
        Assert.That(tucos, Has.Count.EqualTo(6).And.All.InRange(0.0, 1.0));
        r = Peft.Run("inspect", "--base", pre, "--variant", lora, "--tuco", "--top", "3", "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--top does not apply with --tuco")), Is.EqualTo((2, true)), r.Err);
        r = Peft.Run("inspect", "--base", pre, "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("give one of --finetuned or --variant")), Is.EqualTo((2, true)), r.Err);

        // Delta-CoMe compresses the LoRA-merged model's change to a mixed-precision PEFT LoRA folder that eval serves.
        r = Peft.Run("compress", "--base", pre, "--finetuned", Path.Combine(TempDir, "lora-merged"), "--method", "delta-come", "--rank", "4", "--out", Path.Combine(TempDir, "dc"),
            "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("Delta-CoMe: 4 linear changes")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"dc={Path.Combine(TempDir, "dc")}", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("dc:")), Is.EqualTo((0, true)), r.Err);

        // Contrastive generation and proxy-tuning decode from summed logits. Proxy-tuning a model by itself and its
        // LoRA adds and takes away the same logits, so it decodes as the LoRA does.
        string[] Gen(params string[] extra) => new[] { "generate", "--model", pre, "--prompt", "reverse abc=", "--max-tokens", "4", "--device", "cpu" }.Concat(extra).ToArray();
        r = Peft.Run(Gen("--adapters", $"lora={lora}", "--contrast", "lora", "--contrast-alpha", "0.5"));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var loraAlone = Peft.Run(Gen("--adapters", $"lora={lora}", "--variant", "lora"));
        r = Peft.Run(Gen("--proxy-base", pre, "--proxy-expert", lora));
        Assert.That((r.Code, r.Out), Is.EqualTo((0, loraAlone.Out)), r.Err);
        r = Peft.Run(Gen("--proxy-base", pre, "--proxy-expert", fine));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        r = Peft.Run(Gen("--contrast-alpha", "2"));
        Assert.That((r.Code, r.Err.Contains("--contrast-alpha applies to --contrast")), Is.EqualTo((2, true)), r.Err);
        r = Peft.Run(Gen("--adapters", $"lora={lora}", "--variant", "lora", "--contrast", "lora"));
        Assert.That((r.Code, r.Err.Contains("--variant does not apply with --contrast")), Is.EqualTo((2, true)), r.Err);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"lora={lora}", "--contrast", "lora", "--contrast-alpha", "0.5",
            "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("contrastive (1 + 0.5) x lora - 0.5 x base: builtin:tasks=reverse")), Is.EqualTo((0, true)), r.Err + r.Out);

        // LoRD factors the pre-trained model's own weights; every command loads the folder as a model.
        string lordDir = Path.Combine(TempDir, "lord");
        r = Peft.Run("compress", "--model", pre, "--method", "lord", "--rank-ratio", "0.25", "--out", lordDir, "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("LoRD: 14 of 14 linear weights as low-rank factors")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("eval", "--model", lordDir, "--data", "builtin:tasks=reverse", "--examples", "4", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("loss")), Is.EqualTo((0, true)), r.Err);
        r = Peft.Run("compress", "--model", pre, "--method", "lord", "--out", Path.Combine(TempDir, "lord2"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("give exactly one of --rank and --rank-ratio")), Is.EqualTo((2, true)), r.Err);
        r = Peft.Run("compress", "--base", pre, "--method", "lord", "--rank", "4", "--out", Path.Combine(TempDir, "lord2"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--base does not apply to --method lord")), Is.EqualTo((2, true)), r.Err);
        r = Peft.Run("compress", "--base", pre, "--out", Path.Combine(TempDir, "bd"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("give --finetuned")), Is.EqualTo((2, true)), r.Err);

        // merge --interpolate writes the WiSE-FT curve from the base to the full fine-tune.
        r = Peft.Run("merge", "--model", pre, "--interpolate", fine, "--data", "builtin:tasks=reverse", "--points", "3", "--examples", "4", "--out", Path.Combine(TempDir, "wise"),
            "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("alpha 0.50: loss")), Is.EqualTo((0, true)), r.Err + r.Out);
        Assert.That(File.Exists(Path.Combine(TempDir, "wise", "wise_ft.json")) && File.Exists(Path.Combine(TempDir, "wise", "wise_ft.svg")));

        // SSF writes its own folder, scored unmerged; merging its trained shifts into Llama's bias-less modules is refused.
        string ssfDir = Path.Combine(TempDir, "ssf");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "ssf", "--steps", "2", "--batch-size", "2", "--out", ssfDir, "--quiet", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("SSF on 14 linear modules")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--adapter", $"ssf={ssfDir}", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("ssf:")), Is.EqualTo((0, true)), r.Err);
        r = Peft.Run("merge", "--model", pre, "--adapter", ssfDir, "--out", Path.Combine(TempDir, "ssf-merged"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("SSF shift on")), Is.EqualTo((2, true)), r.Err);

        // GaLore is an optimizer of any method; its flags belong to it.
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--optimizer", "galore", "--galore-rank", "4", "--galore-every", "2", "--galore-cross-head", "--steps", "3",
            "--batch-size", "2", "--out", Path.Combine(TempDir, "galore"), "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--galore-rank", "4", "--steps", "1", "--out", Path.Combine(TempDir, "not-galore"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--galore-rank applies to --optimizer galore")), Is.EqualTo((2, true)), r.Err);

        // eval --per-example: each example's loss per variant and its log-likelihood ratio to the base (an OOD score).
        string perExample = Path.Combine(TempDir, "per-example.jsonl");
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "3", "--adapter", $"lora={lora}", "--per-example", perExample, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var scored = File.ReadAllLines(perExample).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!).ToList();
        Assert.That(scored.Select(n => n["log_likelihood_ratio"]!["lora"]!.GetValue<double>()).ToList(), Has.Count.EqualTo(3).And.All.Not.NaN);

        // MeZO trains every parameter from two forward passes a step; its flag belongs to it alone.
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "mezo", "--mezo-eps", "0.01", "--steps", "2", "--batch-size", "2", "--out",
            Path.Combine(TempDir, "mezo"), "--quiet", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("MeZO: zeroth-order SGD")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--mezo-eps", "0.01", "--steps", "1", "--out", Path.Combine(TempDir, "not-mezo"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--mezo-eps applies to --method mezo")), Is.EqualTo((2, true)), r.Err);

        // ComPEFT compresses the full fine-tune to a ternary sparse delta that eval serves beside the base.
        r = Peft.Run("compress", "--base", pre, "--finetuned", fine, "--method", "compeft", "--density", "0.2", "--out", Path.Combine(TempDir, "compeft"), "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("ComPEFT:")), Is.EqualTo((0, true)), r.Err + r.Out);
        r = Peft.Run("eval", "--model", pre, "--data", "builtin:tasks=reverse", "--examples", "4", "--delta", $"cp={Path.Combine(TempDir, "compeft")}", "--device", "cpu");
        Assert.That((r.Code, r.Out.Contains("cp:")), Is.EqualTo((0, true)), r.Err);
        r = Peft.Run("compress", "--base", pre, "--finetuned", fine, "--method", "compeft", "--rounds", "2", "--out", Path.Combine(TempDir, "compeft2"), "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--rounds does not apply to --method compeft")), Is.EqualTo((2, true)), r.Err);

        // Prefix tuning writes a PEFT PREFIX_TUNING folder that peft generate --prefix reads; grouped completions train.
        string prefixDir = Path.Combine(TempDir, "prefix");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "prefix", "--virtual-tokens", "4", "--prefix-projection", "8", "--steps", "2", "--batch-size", "2",
            "--out", prefixDir, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("prefix tuning: 4 virtual tokens per layer through a 8-wide MLP"));
        Assert.That(File.ReadAllText(Path.Combine(prefixDir, "adapter_config.json")), Does.Contain("PREFIX_TUNING"));
        r = Peft.Run("generate", "--model", pre, "--prefix", prefixDir, "--prompt", "abc", "--max-tokens", "3", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        string jsonl = Path.Combine(TempDir, "grouped.jsonl");
        File.WriteAllLines(jsonl, Enumerable.Range(0, 12).Select(i => $"{{\"prompt\": \"p{i / 3}\", \"completion\": \"c{i}\"}}"));
        r = Peft.Run("finetune", "--model", pre, "--data", jsonl, "--group-completions", "--steps", "2", "--batch-size", "6", "--out", Path.Combine(TempDir, "grouped"), "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        r = Peft.Run("finetune", "--model", pre, "--data", jsonl, "--group-completions", "--method", "prefix", "--virtual-tokens", "4", "--steps", "2", "--batch-size", "6",
            "--out", Path.Combine(TempDir, "grouped-prefix"), "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.Exists(Path.Combine(TempDir, "grouped-prefix", "adapter_config.json")), "prefix tuning on grouped completions writes its PEFT folder");

        // Sparse fine-tuning writes a sparse delta folder that peft merge --delta applies.
        string sparseDir = Path.Combine(TempDir, "sparse");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "sparse", "--density", "0.02", "--mask", "random", "--regrow-every", "1", "--steps", "2",
            "--batch-size", "2", "--checkpoint-every", "1", "--out", sparseDir, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("sparse fine-tuning:").And.Contain("masks by random").And.Contain("dropped and regrown"));
        string sparse2 = Path.Combine(TempDir, "sparse-resumed");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "sparse", "--density", "0.02", "--mask", "random", "--regrow-every", "1", "--steps", "2",
            "--batch-size", "2", "--out", sparse2, "--quiet", "--device", "cpu", "--resume", Path.Combine(sparseDir, "checkpoint"));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("masks by the checkpoint"));
        Assert.That(File.ReadAllBytes(Path.Combine(sparse2, "sparse_delta.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(sparseDir, "sparse_delta.safetensors"))),
            "a resumed sparse fine-tune writes the same delta against --model");
        r = Peft.Run("finetune", "--data", "builtin:tasks=reverse", "--method", "sparse", "--steps", "2", "--out", sparse2, "--quiet", "--device", "cpu", "--resume", Path.Combine(sparseDir,
            "checkpoint"));
        Assert.That(r.Err, Does.Contain("--model"));
        r = Peft.Run("merge", "--model", pre, "--delta", sparseDir, "--out", Path.Combine(TempDir, "sparse-merged"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("a sparse delta of"));
        Assert.That(File.ReadAllText(Path.Combine(TempDir, "dora", "adapter_config.json")), Does.Contain("\"use_dora\": true"));
        string dora2 = Path.Combine(TempDir, "dora-resumed");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=reverse", "--method", "lora", "--rank", "4", "--dora", "--steps", "4", "--batch-size", "2",
            "--checkpoint-every", "2", "--out", dora2, "--quiet", "--device", "cpu", "--resume", Path.Combine(TempDir, "dora", "checkpoint"));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(dora2, "adapter_model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(TempDir, "dora", "adapter_model.safetensors"))),
            "resuming from the final checkpoint restores the adapter state exactly (the managed TrainingRunTests interrupt runs midway)");
        string sgd = Path.Combine(TempDir, "sgd");
        r = Peft.Run("finetune", "--model", pre, "--data", "builtin:tasks=add", "--optimizer", "sgd", "--steps", "2", "--batch-size", "2", "--out", sgd, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        // Resume the pre-training run from its step-3 checkpoint to step 6: same final weights as the uninterrupted run.
        string resumed = Path.Combine(TempDir, "resumed");
        r = Peft.Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "4", "--checkpoint-every", "0", "--out", resumed, "--quiet", "--device", "cpu",
            "--resume", Path.Combine(pre, "checkpoint"));
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(resumed, "model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(pre, "model.safetensors"))),
            "resumed run ends bit-identical to the uninterrupted one");
    }

    [Test]
    public void Pretrain_ThatDiverges_StopsWithExitCode3NamingTheStep_AndSkipNonFiniteFinishes()
    {
        string outDir = Path.Combine(TempDir, "nan");
        var r = Peft.Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "2", "--lr", "1e12", "--clip", "0", "--out", outDir,
            "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(PeftSharp.Trainer.Program.Diverged), r.Err);
        Assert.That(r.Err.TrimEnd().Split('\n'), Has.Length.EqualTo(1));
        Assert.That(r.Err, Does.Match("^peft: training diverged at step [2-6]: loss "));
        Assert.That(File.Exists(Path.Combine(outDir, "model.safetensors")), Is.False, "no model was written");
        r = Peft.Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--steps", "6", "--batch-size", "2", "--lr", "1e12", "--clip", "0", "--out", outDir,
            "--quiet", "--device", "cpu", "--skip-nonfinite", "--checkpoint-every", "0");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllText(Path.Combine(outDir, "metrics.jsonl")), Does.Contain("\"skipped\""));
    }

    private string OtherVocabModel()
    {
        string m = Path.Combine(TempDir, "vocab300");
        Directory.CreateDirectory(m);
        File.WriteAllText(Path.Combine(m, "config.json"), (PeftSharp.Model.LlamaConfig.Tiny with { VocabSize = 300 }).ToJson());
        return m;
    }

    [Test]
    public void BadValues_OneLineErrorsNamingTheFlag()
    {
        foreach (var (args, expected) in new (string[], string)[]
        {
            (new[] { "pretrain", "--steps", "0", "--out", TempDir }, "--steps 0"),
            (new[] { "pretrain", "--data", "builtin:puzzles", "--out", TempDir, "--steps", "1" }, "builtin:puzzles"),
            (new[] { "pretrain", "--data", "/no/such/file.jsonl", "--out", TempDir, "--steps", "1" }, "/no/such/file.jsonl"),
            (new[] { "finetune", "--model", TempDir, "--method", "dora", "--out", TempDir }, "--method dora"),
            (new[] { "finetune", "--model", TempDir, "--method", "full", "--b-only", "--out", TempDir }, "--b-only applies to --method lora, not --method full"),
            (new[] { "finetune", "--model", TempDir, "--method", "lora", "--targets", "q_proj,attn", "--out", TempDir }, "--targets q_proj,attn"),
            (new[] { "eval", "--model", Path.Combine(TempDir, "missing") }, "config.json"),
            (new[] { "logits", "--model", TempDir, "--tokens", "1,x" }, "'x'"),
            (new[] { "pretrain", "--out", TempDir, "--config", "huge" }, "--config huge"),
            (new[] { "pretrain", "--out", TempDir, "--steps", "1", "--freeze", "*.nothing.*" }, "*.nothing.*"),
            (new[] { "pretrain", "--out", TempDir, "--steps", "1", "--optimizer", "lion" }, "--optimizer lion"),
            (new[] { "eval", "--model", OtherVocabModel() }, "vocab_size 300"),
        })
        {
            var (code, _, err) = Peft.Run(args);
            Assert.That(code, Is.EqualTo(2), string.Join(" ", args));
            Assert.That(err.Trim().Split('\n'), Has.Length.EqualTo(1), err);
            Assert.That(err, Does.Contain(expected), string.Join(" ", args));
        }
    }
}

public sealed class HostServingTests : TempDirectoryTest
{
    /// <summary>
    /// --adapter-per-task: one LoRA adapter per task trained in the same batches; each is a PEFT folder that serves
    /// next to the other in one generation batch; resuming from the last checkpoint writes the same adapters.
    /// </summary>
    [Test]
    public void FinetuneAdapterPerTask_WritesAnAdapterPerTask_ResumesAndServesThemTogether()
    {
        using (var device = new PeftSharp.Engine.Cpu.CpuDevice())
        using (var model = PeftSharp.Model.LlamaModel.Create(device, PeftSharp.Model.LlamaConfig.Tiny, seed: 13))
        {
            PeftSharp.Formats.HuggingFaceFolder.Save(model, Path.Combine(TempDir, "base"));
        }

        string baseDir = Path.Combine(TempDir, "base"), outDir = Path.Combine(TempDir, "sets");
        string[] flags = { "finetune", "--model", baseDir, "--data", "builtin:tasks=reverse,sort", "--method", "lora", "--rank", "4", "--adapter-per-task", "--steps", "4",
            "--batch-size", "6", "--checkpoint-every", "2", "--quiet", "--device", "cpu" };
        var r = Peft.Run(flags.Concat(new[] { "--out", outDir }).ToArray());
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("one adapter per task (reverse, sort)").And.Contain("held-out 'sort' through its adapter"));
        foreach (var task in new[] { "reverse", "sort" }) Assert.That(File.Exists(Path.Combine(outDir, task, "adapter_model.safetensors")), task);
        Assert.That(File.ReadAllBytes(Path.Combine(outDir, "reverse", "adapter_model.safetensors")), Is.Not.EqualTo(File.ReadAllBytes(Path.Combine(outDir, "sort", "adapter_model.safetensors"))));

        string resumed = Path.Combine(TempDir, "sets-resumed");
        r = Peft.Run(flags.Concat(new[] { "--out", resumed, "--resume", Path.Combine(outDir, "checkpoint") }).ToArray());
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        foreach (var task in new[] { "reverse", "sort" })
        {
            Assert.That(File.ReadAllBytes(Path.Combine(resumed, task, "adapter_model.safetensors")), Is.EqualTo(File.ReadAllBytes(Path.Combine(outDir, task, "adapter_model.safetensors"))), task);
        }

        string requests = Path.Combine(TempDir, "requests.jsonl");
        File.WriteAllLines(requests, new[] { "{\"prompt\": \"reverse abc=\", \"adapter\": \"reverse\"}", "{\"prompt\": \"sort cba=\", \"adapter\": \"sort\"}" });
        r = Peft.Run("generate", "--model", baseDir, "--adapters", $"reverse={Path.Combine(outDir, "reverse")},sort={Path.Combine(outDir, "sort")}", "--requests", requests, "--max-tokens",
            "3", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Err, Does.Contain("2 requests over 2 variants in one batch"));
        r = Peft.Run("finetune", "--model", baseDir, "--data", "builtin:tasks=reverse", "--method", "lora", "--adapter-per-task", "--dora", "--steps", "1", "--out", Path.Combine(TempDir,
            "x"), "--quiet", "--device", "cpu");
        Assert.That(r.Err, Does.Contain("--adapter-per-task"));
    }

    [Test]
    public void GenerateRequests_MixedAdapters_EachLineMatchesItsAdapterAlone()
    {
        using var device = new PeftSharp.Engine.Cpu.CpuDevice();
        using var model = PeftSharp.Model.LlamaModel.Create(device, PeftSharp.Model.LlamaConfig.Tiny, seed: 12);
        string baseDir = Path.Combine(TempDir, "base"), adapterDir = Path.Combine(TempDir, "a"), mergedDir = Path.Combine(TempDir, "merged");
        PeftSharp.Formats.HuggingFaceFolder.Save(model, baseDir);
        var adapter = PeftSharp.Tests.Managed.ServingTests.Adapter(model.Config, 4, PeftSharp.Formats.LoraAdapterConfig.LlamaLinear, 40, scaleB: 0.5f);
        adapter.Save(adapterDir, model.Config);
        PeftSharp.Model.LoraMerge.Merge(model, adapter);
        PeftSharp.Formats.HuggingFaceFolder.Save(model, mergedDir);
        string requests = Path.Combine(TempDir, "requests.jsonl");
        File.WriteAllLines(requests, new[]
        {
            "{\"prompt\": \"abc\", \"adapter\": \"a\"}",
            "{\"prompt\": \"abc\"}",
            "",
            "{\"prompt\": \"xyz\", \"variant\": \"a\", \"max_tokens\": 3}",
        });
        var r = Peft.Run("generate", "--model", baseDir, "--adapters", $"a={adapterDir}", "--requests", requests, "--max-tokens", "5", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var lines = r.Out.Trim().Split('\n').Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!).ToArray();
        Assert.That(lines, Has.Length.EqualTo(3));
        Assert.That(r.Err, Does.Contain("3 requests over 2 variants in one batch"));
        string Alone(string dir, string prompt, string max) => Peft.Run("generate", "--model", dir, "--prompt", prompt, "--max-tokens", max, "--device", "cpu").Out.TrimEnd('\n');
        Assert.That(lines[0]["completion"]!.GetValue<string>(), Is.EqualTo(Alone(mergedDir, "abc", "5")));
        Assert.That(lines[1]["completion"]!.GetValue<string>(), Is.EqualTo(Alone(baseDir, "abc", "5")));
        Assert.That(lines[2]["completion"]!.GetValue<string>(), Is.EqualTo(Alone(mergedDir, "xyz", "3")));
        Assert.That(lines[1]["variant"]!.GetValue<string>(), Is.EqualTo("base"));

        File.WriteAllText(requests, "{\"prompt\": \"abc\", \"adapter\": \"zzz\"}\n");
        r = Peft.Run("generate", "--model", baseDir, "--adapters", $"a={adapterDir}", "--requests", requests, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("no variant named 'zzz'"));
        File.WriteAllText(requests, "{\"prompt\": \"abc\"}\n{\"promt\": 1}\n");
        r = Peft.Run("generate", "--model", baseDir, "--requests", requests, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("requests.jsonl:2"));
        r = Peft.Run("generate", "--model", baseDir, "--adapters", "a", "--prompt", "x", "--device", "cpu");
        Assert.That(r.Err, Does.Contain("expected name=FOLDER"));

        // One prompt through a named variant (the same batch path), and variants given for a prompt without choosing one.
        r = Peft.Run("generate", "--model", baseDir, "--adapters", $"a={adapterDir}", "--prompt", "abc", "--variant", "a", "--max-tokens", "5", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out.TrimEnd('\n'), Is.EqualTo(Alone(mergedDir, "abc", "5")));
        r = Peft.Run("generate", "--model", baseDir, "--adapters", $"a={adapterDir}", "--prompt", "abc", "--variant", "base", "--max-tokens", "5", "--device", "cpu");
        Assert.That(r.Out.TrimEnd('\n'), Is.EqualTo(Alone(baseDir, "abc", "5")));
        r = Peft.Run("generate", "--model", baseDir, "--adapters", $"a={adapterDir}", "--prompt", "abc", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("--variant"));
        r = Peft.Run("generate", "--model", baseDir, "--requests", requests, "--variant", "a", "--device", "cpu");
        Assert.That((r.Code, r.Err.Contains("--variant")), Is.EqualTo((2, true)));
    }
}

public sealed class HostCompressTests : TempDirectoryTest
{
    [Test]
    public void CompressMergeGenerate_OneBitDeltas_EndToEnd()
    {
        using var device = new PeftSharp.Engine.Cpu.CpuDevice();
        using var b = PeftSharp.Model.LlamaModel.Create(device, PeftSharp.Model.LlamaConfig.Tiny, seed: 21);
        using var f = PeftSharp.Tests.Managed.BitDeltaCompressionTests.FineTuneOf(b, 900, size: 0.5f); // large enough to change greedy text
        string baseDir = Path.Combine(TempDir, "base"), fineDir = Path.Combine(TempDir, "fine"), deltaDir = Path.Combine(TempDir, "delta"), mergedDir = Path.Combine(TempDir, "merged");
        PeftSharp.Formats.HuggingFaceFolder.Save(b, baseDir);
        PeftSharp.Formats.HuggingFaceFolder.Save(f, fineDir);
        var r = Peft.Run("compress", "--base", baseDir, "--finetuned", fineDir, "--out", deltaDir, "--distill-steps", "0", "--batch-size", "2", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("compressed 14 linear weights to 1 bit per weight").And.Contain("no distillation"));
        // --distill-steps 0 keeps mean |delta| exactly.
        var saved = PeftSharp.Compression.BitDelta.Load(deltaDir, b);
        var expected = PeftSharp.Compression.BitDelta.Compress(b, f);
        foreach (var (m, d) in expected.Modules) Assert.That(saved.Modules[m].Scales, Is.EqualTo(d.Scales), m);

        r = Peft.Run("merge", "--model", baseDir, "--delta", deltaDir, "--out", mergedDir, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("merged 14 1-bit deltas (1 round) and 0 dense tensors"));

        string requests = Path.Combine(TempDir, "requests.jsonl");
        File.WriteAllLines(requests, new[] { "{\"prompt\": \"abc\", \"delta\": \"ft\"}", "{\"prompt\": \"abc\"}" });
        r = Peft.Run("generate", "--model", baseDir, "--deltas", $"ft={deltaDir}", "--requests", requests, "--max-tokens", "5", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        var lines = r.Out.Trim().Split('\n').Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!["completion"]!.GetValue<string>()).ToArray();
        string Alone(string dir) => Peft.Run("generate", "--model", dir, "--prompt", "abc", "--max-tokens", "5", "--device", "cpu").Out.TrimEnd('\n');
        Assert.That(lines[0], Is.EqualTo(Alone(mergedDir)));
        Assert.That(lines[1], Is.EqualTo(Alone(baseDir)));
        Assert.That(lines[0], Is.Not.EqualTo(lines[1]), "the delta changes the output, so the checks above can fail");

        // The delta refuses a different base.
        r = Peft.Run("merge", "--model", fineDir, "--delta", deltaDir, "--out", Path.Combine(TempDir, "x"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("only applies to its own base"));
        string graftDir = Path.Combine(TempDir, "graft");
        r = Peft.Run("localize", "--base", baseDir, "--finetuned", fineDir, "--budget", "0.001", "--steps", "2", "--data", "builtin:tasks=copy", "--batch-size", "2",
            "--out", graftDir, "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("grafted").And.Contain("(0.100% of the model)"));
        Assert.That(File.Exists(Path.Combine(graftDir, "sparse_config.json")));
        r = Peft.Run("compress", "--base", baseDir, "--finetuned", fineDir, "--out", deltaDir, "--rounds", "0");
        Assert.That(r.Code, Is.EqualTo(2));
        Assert.That(r.Err, Does.Contain("--rounds 0"));
    }

    [Test]
    public void LongErrorLists_OneItemALine_ShortOnesStayOneLine()
    {
        Assert.That(PeftSharp.Trainer.Program.ListOneItemALine("f: the weights do not match config.json (4 problems): a; b; c; d"),
            Is.EqualTo(string.Join(Environment.NewLine, "f: the weights do not match config.json (4 problems):", "  - a", "  - b", "  - c", "  - d")));
        Assert.That(PeftSharp.Trainer.Program.ListOneItemALine("config.json: x; y"), Is.EqualTo("config.json: x; y"));
    }
}
