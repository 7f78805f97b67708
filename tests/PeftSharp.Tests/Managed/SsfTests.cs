using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// SSF: y = (x W^T) * gamma + beta after chosen linear modules. Merged into W and a module's bias (Qwen2's q/k/v),
/// refused where a shift would need a bias the module lacks, served per row (scale and own bias), trained as the
/// model's own layer (finite differences), and read back from its folder.
/// </summary>
public sealed class SsfTests : TempDirectoryTest
{
    private static SsfAdapter Adapter(LlamaConfig c, IEnumerable<string> modules, int seed) => new(modules.ToDictionary(m => m, m =>
    {
        int o = PeftLoraAdapter.LinearShape(c, m).Out;
        return (TestData.Uniform(o, seed + m.Length, 0.5f, 1.5f), TestData.Uniform(o, seed + 2 * m.Length, -0.3f, 0.3f));
    }));

    [Test]
    public void Ssf_MergesIntoBiasedModules_ServedEqualsMerged_RefusedWithoutABias()
    {
        using var device = new CpuDevice();
        var qwen = LoraTrainingTests.Micro with { QkvBias = true };
        using var model = LlamaModel.Create(device, qwen, 31);
        var adapter = Adapter(qwen, new[] { "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj" }, 5);
        adapter.Save(Path.Combine(TempDir, "ssf"), qwen);
        var back = (SsfAdapter)VariantFolder.Load(Path.Combine(TempDir, "ssf"), model);
        foreach (var (m, (g, b)) in adapter.Modules) Assert.That((back.Modules[m].Scale, back.Modules[m].Shift), Is.EqualTo((g, b)), m);

        using var merged = LlamaModel.FromTensors(device, qwen, (name, _) => model[name].Value.ToArray());
        back.MergeInto(merged);
        const string v = "model.layers.1.self_attn.v_proj";
        var (gamma, beta) = adapter.Modules[v];
        var b0 = model[v + ".bias"].Value.ToArray();
        Assert.That(merged[v + ".bias"].Value.ToArray(), Is.EqualTo(b0.Select((x, i) => gamma[i] * x + beta[i]).ToArray()).Within(1e-6f), "b' = gamma b + beta");
        int cols = model[v + ".weight"].Value.Dim(1);
        Assert.That(merged[v + ".weight"].Value.ToArray(), Is.EqualTo(model[v + ".weight"].Value.ToArray().Select((x, i) => x * gamma[i / cols]).ToArray()), "rows times gamma");

        using var set = new VariantSet(model);
        set.Add("ssf", back);
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };
        var rows = MixedBatch.Decode(model, set, prompts, new[] { -1, 0 });
        Check.Close(rows[1], MixedBatch.Alone(merged, prompts[1]), (2e-5, 2e-4), "served = merged");
        Check.Close(rows[0], MixedBatch.Alone(model, prompts[0]), (2e-5, 2e-4), "base row");

        // Training SSF after a biased module is refused before any layer is attached; one adapter kind per model.
        using var trained = LlamaModel.FromTensors(device, qwen, (name, _) => model[name].Value.ToArray());
        Assert.Throws<NotSupportedException>(() => trained.AddSsf(new[] { "model.layers.0.mlp.up_proj", v }));
        Assert.That(trained.Ssf, Is.Empty, "nothing half-attached");
        trained.AddSsf(new[] { "model.layers.0.mlp.up_proj" });
        Assert.That(Assert.Throws<InvalidOperationException>(() => trained.AddIa3(new Ia3Config()))!.Message, Does.Contain("IA3 goes on a model without"));
        Assert.Throws<InvalidOperationException>(() => trained.AddLora(new LoraAdapterConfig { R = 2 }, seed: 1));

        using var llama = LlamaModel.Create(device, LoraTrainingTests.Micro, 32);
        var bare = Adapter(LoraTrainingTests.Micro, new[] { "model.layers.0.mlp.down_proj" }, 6);
        var before = llama["model.layers.0.mlp.down_proj.weight"].Value.ToArray();
        Assert.That(Assert.Throws<NotSupportedException>(() => bare.MergeInto(llama))!.Message, Does.Contain("SSF shift on model.layers.0.mlp.down_proj").And.Contain("no bias"));
        Assert.That(llama["model.layers.0.mlp.down_proj.weight"].Value.ToArray(), Is.EqualTo(before), "a refused merge changes nothing");
    }

    [Test]
    public void Ssf_OwnLayer_EqualsServed_AndGradientsMatchFiniteDifferences()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        using var model = LlamaModel.FromTensors(device, c, (name, shape) =>
        {
            var v = TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length * 3 + shape[0], -0.5f, 0.5f);
            return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
        });
        var modules = LoraAdapterConfig.LlamaLinearModules(c).ToList();
        var adapter = Adapter(c, modules, 9);
        using var set = new VariantSet(model);
        set.Add("ssf", adapter);
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };
        var rows = MixedBatch.Decode(model, set, prompts, new[] { -1, 0 });
        using var own = LlamaModel.FromTensors(device, c, (name, _) => model[name].Value.ToArray());
        own.AddSsf(modules, from: adapter);
        Check.Close(rows[1], MixedBatch.Alone(own, prompts[1]), (2e-5, 2e-4), "served (row scale and own bias) = the model's own SSF layers");
        Assert.That(MixedBatch.Alone(model, prompts[1]), Is.Not.EqualTo(rows[1]).Within(1e-4f), "SSF changes the logits");

        model["model.embed_tokens.weight"].Trainable = true;
        own["model.embed_tokens.weight"].Trainable = true;
        own.ZeroGrad();
        own.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
        var trainable = own.AllParameters.Where(p => p.Trainable).ToList();
        Assert.That(trainable.Count, Is.EqualTo(2 * modules.Count + 1));
        Assert.That(ModelGradients.Check(own, trainable, LoraTrainingTests.Tokens, LoraTrainingTests.Targets, batch: 2, samples: 3), Is.EqualTo(3 * trainable.Count));
        Assert.That(own.ExportSsf().Modules[modules[3]].Scale, Is.EqualTo(adapter.Modules[modules[3]].Scale), "exported as loaded");
    }
}
