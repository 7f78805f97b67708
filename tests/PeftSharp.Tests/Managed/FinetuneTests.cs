using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>The host's recipes as library calls: <see cref="Finetune.Prepare"/> and <see cref="Finetune.Train"/> without the host.</summary>
public sealed class FinetuneTests : TempDirectoryTest
{
    private static readonly TrainOptions Short = new() { Steps = 2, BatchSize = 2, SeqLen = 40, WarmupSteps = 1, CheckpointEvery = 0, CompletionOnly = true };

    [Test]
    public void Train_FreezesWhatOptionsName_WithOrWithoutALog()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 3);
        var embed = model["model.embed_tokens.weight"].Value.ToArray();
        var up = model["model.layers.0.mlp.up_proj.weight"].Value.ToArray();
        var options = new FinetuneOptions { Freeze = new[] { "model.embed_tokens.*" } };
        var metrics = Finetune.Train(model, ExampleSource.Tasks(new[] { "copy" }, 1, Split.Train), Short, options, Path.Combine(TempDir, "full"), "test");
        Assert.That(metrics, Has.Count.EqualTo(2));
        Assert.That(model["model.embed_tokens.weight"].Value.ToArray(), Is.EqualTo(embed), "frozen, though no log was given");
        Assert.That(model["model.layers.0.mlp.up_proj.weight"].Value.ToArray(), Is.Not.EqualTo(up), "the rest trains");
        Assert.That(File.Exists(Path.Combine(TempDir, "full", "config.json")) && File.Exists(Path.Combine(TempDir, "full", "loss.svg")));
    }

    [Test]
    public void PrepareLora_TrainsTheAdapterOnly_AndSavesAPeftFolder()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 4);
        var q = model["model.layers.1.self_attn.q_proj.weight"].Value.ToArray();
        var data = ExampleSource.Tasks(new[] { "reverse" }, 2, Split.Train);
        var lora = new LoraAdapterConfig { R = 4, LoraAlpha = 8, TargetRegex = "all-linear" };
        var recipe = Finetune.Prepare(model, new FinetuneOptions { Method = FinetuneMethod.Lora, Lora = lora }, Short, data);
        Assert.That(recipe.Description, Does.Contain("LoRA r = 4").And.Contain("14 modules"));
        Finetune.Train(model, data, Short, recipe.Options, Path.Combine(TempDir, "lora"), "lora", recipe);
        Assert.That(model["model.layers.1.self_attn.q_proj.weight"].Value.ToArray(), Is.EqualTo(q), "the base is frozen");
        var saved = PeftLoraAdapter.Load(Path.Combine(TempDir, "lora"), model.Config);
        Assert.That(saved.Modules, Has.Count.EqualTo(14));
        Assert.That(saved.Modules.Values.Any(m => m.B.Any(v => v != 0)), "B trained away from zero");
        var bad = Assert.Throws<ArgumentException>(() => Finetune.Prepare(model, new FinetuneOptions { Method = FinetuneMethod.Full, LoraBOnly = true }, Short, data))!;
        Assert.That(bad.Message, Does.Contain("LoraBOnly"));
    }
}
