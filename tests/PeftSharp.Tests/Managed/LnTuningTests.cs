using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// LN tuning as PEFT's LN_TUNING saves it: the tuned norms under `{module}.ln_tuning_layers.weight`, PEFT's Llama
/// default targets (input, post-attention and final norms), merged by replacing the norm weights, served per row in a
/// mixed batch, and trained with only those weights unfrozen.
/// </summary>
public sealed class LnTuningTests : TempDirectoryTest
{
    [Test]
    public void LnTuning_FolderAsPeftWritesIt_MergedEqualsServed_OnlyNormsTrain()
    {
        var c = LoraTrainingTests.Micro;
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, c, 9);
        var modules = PeftLnTuningAdapter.TargetsIn(c, PeftLnTuningAdapter.DefaultTargets, null).ToList();
        Assert.That(modules, Is.EqualTo(new[]
        {
            "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
            "model.norm",
        }).AsCollection, "PEFT's Llama default targets, q_norm-style per-head norms excepted");
        string dir = Path.Combine(TempDir, "ln");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """
            {"auto_mapping": null, "base_model_name_or_path": "base", "exclude_modules": null, "inference_mode": true, "modules_to_save": null,
             "peft_type": "LN_TUNING", "revision": null, "target_modules": ["input_layernorm", "post_attention_layernorm", "norm"], "task_type": "CAUSAL_LM"}
            """);
        var tuned = modules.ToDictionary(m => m, m => TestData.Uniform(c.HiddenSize, m.Length, 0.5f, 1.5f));
        SafeTensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"),
            tuned.Select(t => new SafeTensorData($"base_model.model.{t.Key}.ln_tuning_layers.weight", t.Value, new[] { c.HiddenSize })).ToList(), new Dictionary<string, string>());
        var adapter = (PeftLnTuningAdapter)PeftSharp.Variants.VariantFolder.Load(dir, model);
        foreach (var (m, w) in tuned) Assert.That(adapter.Norms[m + ".weight"], Is.EqualTo(w), m);
        adapter.Save(Path.Combine(TempDir, "again"), c);
        Assert.That(PeftLnTuningAdapter.Load(Path.Combine(TempDir, "again"), c).Norms.Keys, Is.EquivalentTo(adapter.Norms.Keys), "round trip");

        using var merged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        adapter.MergeInto(merged);
        Assert.That(merged["model.norm.weight"].Value.ToArray(), Is.EqualTo(tuned["model.norm"]));
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };
        using var set = new VariantSet(model);
        set.Add("ln", adapter);
        var rows = MixedBatch.Decode(model, set, prompts, new[] { -1, 0 });
        Check.Close(rows[1], MixedBatch.Alone(merged, prompts[1]), (2e-5, 2e-4), "LN-tuned row = the merged model");
        Check.Close(rows[0], MixedBatch.Alone(model, prompts[0]), (2e-5, 2e-4), "base row");

        string bad = Path.Combine(TempDir, "bad");
        Directory.CreateDirectory(bad);
        File.Copy(Path.Combine(dir, "adapter_model.safetensors"), Path.Combine(bad, "adapter_model.safetensors"));
        File.WriteAllText(Path.Combine(bad, "adapter_config.json"), File.ReadAllText(Path.Combine(dir, "adapter_config.json")).Replace("\"norm\"]", "\"mlp\"]"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => PeftLnTuningAdapter.Load(bad, c))!.Message, Does.Contain("model.norm.ln_tuning_layers.weight matches no targeted norm"));

        var data = ExampleSource.List(new[] { new Example("t", "ab", "cd"), new Example("t", "ef", "gh") });
        var recipe = Finetune.Prepare(merged, new FinetuneOptions { Method = FinetuneMethod.LnTuning }, new TrainOptions(), data);
        Assert.That(merged.AllParameters.Where(p => p.Trainable).Select(p => p.Name), Is.EquivalentTo(modules.Select(m => m + ".weight")), "only the norms train");
        recipe.Save!(Path.Combine(TempDir, "trained"));
        Assert.That(PeftLnTuningAdapter.Load(Path.Combine(TempDir, "trained"), c).Norms["model.norm.weight"], Is.EqualTo(tuned["model.norm"]), "exported as the model holds them");
    }
}
