using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// IA3 as PEFT defines it: learned vectors scaling k_proj's and v_proj's outputs and down_proj's input (PEFT's Llama
/// defaults), read and written under PEFT's keys and shapes, merged into W's rows and columns, served unmerged per row
/// in a mixed batch and trained as the model's own layer; each path checked against the others and against the
/// merge written out by hand, gradients against finite differences.
/// </summary>
public sealed class Ia3Tests : TempDirectoryTest
{
    /// <summary>An IA3 adapter with PEFT's Llama defaults and vectors around 1.</summary>
    private static PeftIa3Adapter Adapter(LlamaConfig c, int seed)
    {
        var config = new Ia3Config();
        var vectors = config.TargetsIn(c).ToDictionary(m => m, m =>
        {
            var (o, i) = PeftLoraAdapter.LinearShape(c, m);
            return TestData.Uniform(config.IsFeedForward(m) ? i : o, seed + m.Length, 0.5f, 1.5f);
        });
        return new PeftIa3Adapter(config, vectors);
    }

    [Test]
    public void Ia3_Folder_AsPeftWritesIt_AndMergeScalesRowsAndColumns()
    {
        var c = LoraTrainingTests.Micro;
        // adapter_config.json as PEFT saves an IA3Config with its Llama defaults resolved.
        string dir = Path.Combine(TempDir, "ia3");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """
            {"auto_mapping": null, "base_model_name_or_path": "base", "exclude_modules": null, "fan_in_fan_out": false,
             "feedforward_modules": ["down_proj"], "inference_mode": true, "init_ia3_weights": true, "layers_to_transform": null,
             "layers_pattern": null, "modules_to_save": null, "peft_type": "IA3", "revision": null, "target_modules": ["k_proj", "v_proj", "down_proj"],
             "task_type": "CAUSAL_LM"}
            """);
        var adapter = Adapter(c, 3);
        var tensors = adapter.Vectors.Select(v => new SafeTensorData($"base_model.model.{v.Key}.ia3_l", v.Value,
            adapter.Config.IsFeedForward(v.Key) ? new[] { 1, v.Value.Length } : new[] { v.Value.Length, 1 })).ToList();
        SafeTensorsWriter.Write(Path.Combine(dir, "adapter_model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, c, 5);
        var read = (PeftIa3Adapter)PeftSharp.Variants.VariantFolder.Load(dir, model);
        Assert.That(read.Vectors.Keys, Is.EquivalentTo(new[] { "k_proj", "v_proj", "down_proj" }.SelectMany(n => Enumerable.Range(0, 2).Select(i =>
            $"model.layers.{i}.{(n == "down_proj" ? "mlp" : "self_attn")}.{n}"))));
        foreach (var (m, l) in adapter.Vectors) Assert.That(read.Vectors[m], Is.EqualTo(l), m);
        string again = Path.Combine(TempDir, "again");
        read.Save(again, c);
        var back = PeftIa3Adapter.Load(again, c);
        foreach (var (m, l) in adapter.Vectors) Assert.That(back.Vectors[m], Is.EqualTo(l), $"round trip {m}");

        using var merged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        read.MergeInto(merged);
        const string k = "model.layers.1.self_attn.k_proj", down = "model.layers.0.mlp.down_proj";
        var wk = model[k + ".weight"].Value;
        int kin = wk.Dim(1), din = model[down + ".weight"].Value.Dim(1);
        Assert.That(merged[k + ".weight"].Value.ToArray(), Is.EqualTo(wk.ToArray().Select((w, i) => w * read.Vectors[k][i / kin]).ToArray()), "k_proj: rows times l");
        Assert.That(merged[down + ".weight"].Value.ToArray(), Is.EqualTo(model[down + ".weight"].Value.ToArray().Select((w, i) => w * read.Vectors[down][i % din]).ToArray()),
            "down_proj (feedforward): columns times l");

        foreach (var (from, to, expected) in new[]
        {
            ("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true", "fan_in_fan_out"),
            ("\"modules_to_save\": null", "\"modules_to_save\": [\"lm_head\"]", "modules_to_save is not supported for IA3"),
            ("\"feedforward_modules\": [\"down_proj\"]", "\"feedforward_modules\": [\"up_proj\"]", "feedforward_modules must be a subset of target_modules"),
        })
        {
            string bad = Path.Combine(TempDir, "bad");
            Directory.CreateDirectory(bad);
            File.Copy(Path.Combine(dir, "adapter_model.safetensors"), Path.Combine(bad, "adapter_model.safetensors"), overwrite: true);
            File.WriteAllText(Path.Combine(bad, "adapter_config.json"), File.ReadAllText(Path.Combine(dir, "adapter_config.json")).Replace(from, to));
            Assert.That(Assert.Catch(() => PeftIa3Adapter.Load(bad, c))!.Message, Does.Contain(expected), to);
        }
    }

    /// <summary>
    /// Served unmerged in a mixed batch (the base row, an IA3 row, a LoRA row), each row equals its variant alone: the
    /// IA3 row the merged model, the base row the base; the model's own IA3 layer equals the merged model too; ones
    /// leave the model unchanged.
    /// </summary>
    [Test]
    public void Ia3_ServedUnmerged_AndAsTheModelsOwnLayer_EqualTheMergedModel()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        using var model = LlamaModel.Create(device, c, 6);
        var adapter = Adapter(c, 7);
        using var merged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        adapter.MergeInto(merged);
        var lora = ServingTests.Adapter(c, 2, new[] { "v_proj", "down_proj" }, 40);
        using var loraMerged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        lora.MergeInto(loraMerged);
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 }, new[] { 2, 7 } };
        using var set = new VariantSet(model);
        set.Add("ia3", adapter);
        set.Add("lora", lora);
        var rows = MixedBatch.Decode(model, set, prompts, new[] { -1, 0, 1 });
        float[] Alone(LlamaModel m, int[] prompt) => MixedBatch.Alone(m, prompt);

        Check.Close(rows[0], Alone(model, prompts[0]), (2e-5, 2e-4), "base row");
        Check.Close(rows[1], Alone(merged, prompts[1]), (2e-5, 2e-4), "IA3 row = the merged model");
        Check.Close(rows[2], Alone(loraMerged, prompts[2]), (2e-5, 2e-4), "LoRA row beside it");
        Assert.That(Alone(model, prompts[1]), Is.Not.EqualTo(rows[1]).Within(1e-4f), "IA3 changes the logits, so the check can fail");

        using var own = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        own.AddIa3(adapter.Config, from: adapter);
        Check.Close(own.Logits(LoraTrainingTests.Tokens, 2), merged.Logits(LoraTrainingTests.Tokens, 2), (2e-5, 2e-4), "own IA3 layer = the merged model");
        using var fresh = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        fresh.AddIa3(new Ia3Config());
        Assert.That(fresh.Logits(LoraTrainingTests.Tokens, 2), Is.EqualTo(model.Logits(LoraTrainingTests.Tokens, 2)), "PEFT's init, ones: the model unchanged");
        Assert.That(fresh.AllParameters.Count(p => p.Trainable), Is.EqualTo(6), "only the six vectors train");
    }

    [Test]
    public void Ia3Gradients_MatchFiniteDifferences()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.FromTensors(device, LoraTrainingTests.Micro, (name, shape) =>
        {
            var v = TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length * 7 + shape[0], -0.5f, 0.5f);
            return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
        });
        model.AddIa3(new Ia3Config { TargetModules = new[] { "k_proj", "v_proj", "up_proj", "down_proj" }, FeedForwardModules = new[] { "down_proj", "up_proj" } });
        foreach (var l in model.Ia3.Values) l.Vector.Value.CopyFrom(TestData.Uniform(l.Vector.Value.Length, l.Vector.Value.Length + 1, 0.5f, 1.5f));
        model["model.embed_tokens.weight"].Trainable = true; // the input path through IA3 too
        model.ZeroGrad();
        model.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
        var trainable = model.AllParameters.Where(p => p.Trainable).ToList();
        Assert.That(ModelGradients.Check(model, trainable, LoraTrainingTests.Tokens, LoraTrainingTests.Targets, batch: 2, samples: 3), Is.EqualTo(3 * trainable.Count));
    }
}
