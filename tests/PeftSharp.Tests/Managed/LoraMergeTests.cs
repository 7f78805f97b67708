using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Kernels.Core;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

public sealed class LoraMergeTests : TempDirectoryTest
{
    private static PeftLoraAdapter Adapter(LlamaConfig c, int seed, bool rslora = false)
    {
        var config = new LoraAdapterConfig { R = 4, LoraAlpha = 8, TargetModules = new[] { "q_proj", "down_proj" }, UseRsLora = rslora };
        var modules = config.TargetsIn(c).ToDictionary(m => m, m =>
        {
            var (o, i) = PeftLoraAdapter.LinearShape(c, m);
            return (TestData.Uniform(4 * i, seed++, -0.1f, 0.1f), TestData.Uniform(o * 4, seed++, -0.1f, 0.1f));
        });
        return new PeftLoraAdapter(config, modules);
    }

    [TestCase(false, TestName = "Merge_EqualsWPlusScaledBA_ThenUnmergeRestores")]
    [TestCase(true, TestName = "Merge_RsLora_EqualsWPlusScaledBA_ThenUnmergeRestores")]
    public void MergeUnmerge(bool rslora)
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, 3);
        var adapter = Adapter(model.Config, 10, rslora);
        const string m = "model.layers.1.mlp.down_proj";
        var before = model[m + ".weight"].Value.ToArray();
        var untargeted = model["model.layers.0.mlp.up_proj.weight"].Value.ToArray();
        LoraMerge.Merge(model, adapter);
        Assert.That(model["model.layers.0.mlp.up_proj.weight"].Value.ToArray(), Is.EqualTo(untargeted), "modules the adapter does not target are untouched");
        var (a, b) = adapter.Modules[m];
        var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, m);
        var expected = (float[])before.Clone();
        MatMulReference.Forward(b, a, expected, new MatMulShape(1, outF, inF, 4, false, false, true), alpha: adapter.Config.Scale(m), beta: 1f);
        Check.Close(model[m + ".weight"].Value.ToArray(), expected, Tolerances.Dot(4), "merged weight");
        Assert.That(adapter.Config.Scale(m), Is.EqualTo(rslora ? 8f / 2f : 2f));
        LoraMerge.Unmerge(model, adapter);
        // Merge then unmerge rounds twice in fp32: |W| ~ 0.05, |s B A| ~ 0.02, so the error stays below 1e-7 absolute.
        Check.Close(model[m + ".weight"].Value.ToArray(), before, (1e-7, 1e-6), "unmerged weight");
    }

    [Test]
    public void PeftMergeCommand_WritesAModelWithTheAdapterBakedIn()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, 5);
        string baseDir = Path.Combine(TempDir, "base"), adapterDir = Path.Combine(TempDir, "adapter"), outDir = Path.Combine(TempDir, "merged");
        HuggingFaceFolder.Save(model, baseDir);
        var adapter = Adapter(model.Config, 20);
        adapter.Save(adapterDir, model.Config);
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = PeftSharp.Trainer.Program.Run(new[] { "merge", "--model", baseDir, "--adapter", adapterDir, "--out", outDir, "--device", "cpu" }, stdout, stderr);
        Assert.That(code, Is.EqualTo(0), stderr.ToString());
        Assert.That(stdout.ToString(), Does.Contain("merged 4 LoRA modules"));
        using var merged = HuggingFaceFolder.Load(outDir, device);
        LoraMerge.Merge(model, adapter);
        foreach (var p in model.Parameters) Assert.That(merged[p.Name].Value.ToArray(), Is.EqualTo(p.Value.ToArray()), p.Name);
    }
}
