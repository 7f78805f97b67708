using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// PEFT's lora_bias (lora_B with a bias: the branch adds s (B A x + b)): read and written under PEFT's keys, merged into
/// a module's bias as PEFT merges it (Qwen2's q/k/v), refused where the module has none (as PEFT refuses), served
/// unmerged per row in a mixed batch on any module, and trained (finite differences).
/// </summary>
public sealed class LoraBiasTests : TempDirectoryTest
{
    private static readonly int[][] Prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };

    /// <summary>A lora_bias adapter of rank 2 on <paramref name="targets"/> with random A, B and b.</summary>
    private static PeftLoraAdapter BiasedAdapter(LlamaConfig c, string[] targets, int seed)
    {
        var plain = ServingTests.Adapter(c, 2, targets, seed);
        var config = plain.Config with { LoraBias = true };
        var biases = plain.Modules.Keys.ToDictionary(m => m, m => TestData.Uniform(PeftLoraAdapter.LinearShape(c, m).Out, seed + m.Length, -0.3f, 0.3f));
        return new PeftLoraAdapter(config, plain.Modules, null, null, biases);
    }

    /// <summary>Decodes <see cref="Prompts"/> in one batch, row 0 on the base and row 1 on the variant; returns both rows' logits.</summary>
    private static float[][] MixedRows(LlamaModel model, PeftLoraAdapter adapter)
    {
        using var set = new VariantSet(model);
        set.AddLora("biased", adapter);
        return MixedBatch.Decode(model, set, Prompts, new[] { -1, 0 });
    }

    private static float[] Alone(LlamaModel model, int[] prompt) => MixedBatch.Alone(model, prompt);

    [Test]
    public void LoraBias_FolderRoundTrips_UnderPeftKeys_AndIsRefusedWithDora()
    {
        var c = LoraTrainingTests.Micro;
        var adapter = BiasedAdapter(c, new[] { "q_proj", "down_proj" }, 10);
        string dir = Path.Combine(TempDir, "biased");
        adapter.Save(dir, c);
        using (var file = SafeTensorsFile.Open(Path.Combine(dir, PeftLoraAdapter.WeightsFile)))
        {
            Assert.That(file.Contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.bias"), Is.True, "PEFT's key for lora_B's bias");
        }

        Assert.That(File.ReadAllText(Path.Combine(dir, PeftLoraAdapter.ConfigFile)), Does.Contain("\"lora_bias\": true"));
        var back = PeftLoraAdapter.Load(dir, c);
        Assert.That(back.Config.LoraBias, Is.True);
        Assert.That(back.Biases.Keys, Is.EquivalentTo(adapter.Biases.Keys));
        foreach (var (m, b) in adapter.Biases) Assert.That(back.Biases[m], Is.EqualTo(b), m);

        // A folder whose config says lora_bias but lacks a bias tensor is refused naming the key.
        adapter = BiasedAdapter(c, new[] { "q_proj" }, 11);
        new PeftLoraAdapter(adapter.Config with { LoraBias = false }, adapter.Modules).Save(dir, c);
        File.WriteAllText(Path.Combine(dir, PeftLoraAdapter.ConfigFile), File.ReadAllText(Path.Combine(dir, PeftLoraAdapter.ConfigFile)).Replace("\"lora_bias\": false", "\"lora_bias\": true"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => PeftLoraAdapter.Load(dir, c))!.Message, Does.Contain("missing base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"));
        var json = "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"], \"use_dora\": true, \"lora_bias\": true}";
        Assert.That(Assert.Catch(() => PeftLoraAdapter.ParseConfig(json, "adapter_config.json"))!.Message, Does.Contain("lora_bias = true with use_dora"));
    }

    /// <summary>
    /// On Qwen2's q/k/v (modules with a bias) the merge is PEFT's: W += s B A, b += s b_B; the mixed batch's row for the
    /// variant equals the merged model alone, the base row the base, and an adapter without the bias gives other logits.
    /// </summary>
    [Test]
    public void LoraBias_MergesIntoQwen2Biases_AndServedUnmergedEqualsMerged()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro with { QkvBias = true };
        using var model = LlamaModel.Create(device, c, 21);
        var adapter = BiasedAdapter(c, new[] { "q_proj", "v_proj" }, 30);
        using var merged = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        adapter.MergeInto(merged);
        const string v = "model.layers.1.self_attn.v_proj.bias";
        float s = adapter.Config.Scale("model.layers.1.self_attn.v_proj");
        var expected = model[v].Value.ToArray().Select((x, i) => x + s * adapter.Biases["model.layers.1.self_attn.v_proj"][i]).ToArray();
        Assert.That(merged[v].Value.ToArray(), Is.EqualTo(expected).Within(1e-6f), "b + s b_B");

        var rows = MixedRows(model, adapter);
        Check.Close(rows[0], Alone(model, Prompts[0]), (2e-5, 2e-4), "base row");
        Check.Close(rows[1], Alone(merged, Prompts[1]), (2e-5, 2e-4), "lora_bias row = the merged model");
        var plain = MixedRows(model, new PeftLoraAdapter(adapter.Config with { LoraBias = false }, adapter.Modules));
        Assert.That(plain[1], Is.Not.EqualTo(rows[1]).Within(1e-4f), "the bias changes the logits, so the check above can fail");
        LoraMerge.Unmerge(merged, adapter);
        Check.Close(merged[v].Value.ToArray(), model[v].Value.ToArray(), (1e-6, 1e-5), "unmerge takes the bias back out");
    }

    /// <summary>
    /// On Llama's modules (no bias) the merge is refused naming lora_bias, and nothing changes; served unmerged, the
    /// variant's row equals the model running the adapter as its own trainable layer (a second implementation), and
    /// the gradients of A, B and b match finite differences.
    /// </summary>
    [Test]
    public void LoraBias_OnBiaslessModules_ServesAndTrains_MergeRefused()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        using var model = LlamaModel.Create(device, c, 22);
        var adapter = BiasedAdapter(c, new[] { "o_proj", "down_proj", "up_proj" }, 40);
        var before = model["model.layers.0.mlp.down_proj.weight"].Value.ToArray();
        var e = Assert.Throws<NotSupportedException>(() => adapter.MergeInto(model))!;
        Assert.That(e.Message, Does.Contain("lora_bias").And.Contain("model.layers.0.self_attn.o_proj").And.Contain("no bias"));
        Assert.That(model["model.layers.0.mlp.down_proj.weight"].Value.ToArray(), Is.EqualTo(before), "a refused merge changes nothing");

        var rows = MixedRows(model, adapter);
        using var own = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        own.AddLora(adapter.Config, seed: 1, from: adapter);
        Check.Close(rows[0], Alone(model, Prompts[0]), (2e-5, 2e-4), "base row");
        Check.Close(rows[1], Alone(own, Prompts[1]), (2e-5, 2e-4), "served row = the adapter as the model's own layer");
        Assert.That(own.ExportLora(adapter.Config).Biases["model.layers.1.mlp.up_proj"], Is.EqualTo(adapter.Biases["model.layers.1.mlp.up_proj"]), "exported as loaded");

        own.ZeroGrad();
        own.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
        var trainable = own.AllParameters.Where(p => p.Trainable).ToList();
        Assert.That(trainable.Count(p => p.Name.EndsWith(".lora_B.bias", StringComparison.Ordinal)), Is.EqualTo(6));
        Assert.That(ModelGradients.Check(own, trainable, LoraTrainingTests.Tokens, LoraTrainingTests.Targets, batch: 2, samples: 3), Is.EqualTo(3 * trainable.Count));

        using var fresh = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        fresh.AddLora(adapter.Config, seed: 2);
        Assert.That(fresh.Lora.Values.Select(l => l.BiasB!.Value.ToArray()), Is.All.All.EqualTo(0f), "a new lora_bias starts at zero, as PEFT's");
    }
}
