using NUnit.Framework;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Tests.Formats;

public sealed class HuggingFaceFolderTests : TempDirectoryTest
{

    [TestCase(long.MaxValue, TestName = "Folder_RoundTrip_SingleFile_BitExact")]
    [TestCase(40_000L, TestName = "Folder_RoundTrip_Sharded_BitExact")]
    public void SaveThenLoad_IsBitExact(long shardBytes)
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 1);
        HuggingFaceFolder.Save(model, TempDir, StorageType.F32, shardBytes);
        if (shardBytes != long.MaxValue)
        {
            Assert.That(File.Exists(Path.Combine(TempDir, HuggingFaceFolder.IndexFile)));
            Assert.That(Directory.GetFiles(TempDir, "model-*-of-*.safetensors").Length, Is.GreaterThan(1));
        }

        using var loaded = HuggingFaceFolder.Load(TempDir, device);
        Assert.That(loaded.Config, Is.EqualTo(model.Config));
        foreach (var p in model.Parameters)
        {
            Assert.That(loaded[p.Name].Value.ToArray(), Is.EqualTo(p.Value.ToArray()), p.Name);
        }

        Assert.That(Directory.GetFiles(TempDir, "*.tmp"), Is.Empty);
    }

    [Test]
    public void Load_Bf16Checkpoint_ConvertsToFp32()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 2);
        HuggingFaceFolder.Save(model, TempDir, StorageType.BF16);
        using var loaded = HuggingFaceFolder.Load(TempDir, device);
        var original = model["model.norm.weight"].Value.ToArray(); // ones: exact in bf16
        Assert.That(loaded["model.norm.weight"].Value.ToArray(), Is.EqualTo(original));
        var w = model["model.layers.0.mlp.up_proj.weight"].Value.ToArray();
        var wl = loaded["model.layers.0.mlp.up_proj.weight"].Value.ToArray();
        for (int i = 0; i < w.Length; i++) Assert.That(wl[i], Is.EqualTo(w[i]).Within(Math.Abs(w[i]) / 128 + 1e-30), $"bf16 keeps 8 bits of mantissa, element {i}");
    }

    /// <summary>
    /// Integer buffers a checkpoint may carry (position ids, masks) are skipped with a warning, as transformers skips
    /// them; an unexpected floating-point tensor could be a weight the graph lacks, so it is still refused.
    /// </summary>
    [Test]
    public void Load_SkipsIntegerBuffersWithAWarning_RefusesUnknownFloatTensors()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 4);
        var tensors = model.Parameters.Select(p => new SafeTensorData(p.Name, p.Value.ToArray(), p.Value.Shape.ToArray()))
            .Append(new SafeTensorData("model.position_ids", Array.Empty<float>(), new[] { 1, 4 }) { Ints = new[] { 0, 1, 2, 3 } }).ToList();
        SafeTensorsWriter.Write(Path.Combine(TempDir, HuggingFaceFolder.SingleFile), tensors);
        File.WriteAllText(Path.Combine(TempDir, HuggingFaceFolder.ConfigFile), LlamaConfig.Tiny.ToJson());
        var warnings = new List<string>();
        using (var loaded = HuggingFaceFolder.Load(TempDir, device, warnings.Add))
        {
            Assert.That(loaded["model.norm.weight"].Value.ToArray(), Is.EqualTo(model["model.norm.weight"].Value.ToArray()));
        }

        Assert.That(warnings, Has.One.Contains("skipping tensor model.position_ids (I32 [1, 4])"));
        tensors.Add(new SafeTensorData("model.layers.0.self_attn.q_proj.bias", new float[64], new[] { 64 }));
        SafeTensorsWriter.Write(Path.Combine(TempDir, HuggingFaceFolder.SingleFile), tensors);
        Assert.That(Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(TempDir, device))!.Message,
            Does.Contain("unexpected tensor model.layers.0.self_attn.q_proj.bias (F32)"));
    }

    [Test]
    public void Load_WeightsThatDoNotMatchConfig_ListsEveryProblem()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 3);
        var tensors = model.Parameters
            .Where(p => p.Name != "model.norm.weight")
            .Select(p => p.Name == "model.layers.1.mlp.up_proj.weight"
                ? new SafeTensorData(p.Name, new float[10], new[] { 2, 5 })
                : new SafeTensorData(p.Name, p.Value.ToArray(), p.Value.Shape.ToArray()))
            .Append(new SafeTensorData("model.layers.9.extra.weight", new float[1], new[] { 1 }))
            .ToList();
        SafeTensorsWriter.Write(Path.Combine(TempDir, HuggingFaceFolder.SingleFile), tensors);
        File.WriteAllText(Path.Combine(TempDir, HuggingFaceFolder.ConfigFile), LlamaConfig.Tiny.ToJson());
        var e = Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(TempDir, device))!;
        Assert.That(e.Message, Does.Contain("missing model.norm.weight")
            .And.Contain("model.layers.1.mlp.up_proj.weight is [2, 5], expected [172, 64]")
            .And.Contain("unexpected tensor model.layers.9.extra.weight"));
    }

    [Test]
    public void Load_NotAModelFolder_ClearError()
    {
        using var device = new CpuDevice();
        Assert.That(Assert.Throws<FileNotFoundException>(() => HuggingFaceFolder.Load(TempDir, device))!.Message, Does.Contain("config.json"));
        File.WriteAllText(Path.Combine(TempDir, HuggingFaceFolder.ConfigFile), LlamaConfig.Tiny.ToJson());
        Assert.That(Assert.Throws<FileNotFoundException>(() => HuggingFaceFolder.Load(TempDir, device))!.Message, Does.Contain("model.safetensors"));
    }
}
