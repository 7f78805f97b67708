using NUnit.Framework;
using PeftSharp.Compression;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// Delta-CoMe: the change's top singular triplets at bit widths that fall with the singular value, as a PEFT LoRA
/// adapter. A rank-r change comes back nearly whole at rank r (its error the quantization's), the bit schedule is 8 /
/// 4 / 2, and quantization rounds each vector to its own scale.
/// </summary>
public sealed class DeltaCoMeTests : TempDirectoryTest
{
    [Test]
    public void Quantize_AndTheBitSchedule()
    {
        Assert.That(DeltaCoMe.Quantize(new[] { 1.0, -0.6, 0.2, 0 }, 2), Is.EqualTo(new[] { 1.0, -1.0, 0, 0 }), "2 bits: -s, 0, s");
        Assert.That(DeltaCoMe.Quantize(new[] { 1.0, -0.5, 0.2 }, 8), Is.EqualTo(new[] { 1.0, -64.0 / 127, 25.0 / 127 }).Within(1e-12));
        Assert.That(DeltaCoMe.Quantize(new[] { 0.0, 0 }, 4), Is.EqualTo(new[] { 0.0, 0 }));
        Assert.That(Enumerable.Range(0, 16).Select(i => DeltaCoMe.BitsOf(i, 16)), Is.EqualTo(new[] { 8, 8, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2 }));
    }

    [Test]
    public void DeltaCoMe_OfALoraFineTune_RecoversItsChange_AsAPeftAdapter()
    {
        using var device = new CpuDevice();
        var c = LoraTrainingTests.Micro;
        using var b = LlamaModel.Create(device, c, 12);
        var lora = ServingTests.Adapter(c, 2, LoraAdapterConfig.LlamaLinear, 13, scaleB: 0.5f);
        using var f = LlamaModel.FromTensors(device, c, (name, _) => b[name].Value.ToArray());
        lora.MergeInto(f);
        f["model.norm.weight"].Value.CopyFrom(f["model.norm.weight"].Value.ToArray().Select(v => v * 1.1f).ToArray());
        var (adapter, bytes) = DeltaCoMe.Compress(b, f, rank: 4);
        Assert.That(adapter.Config.ModulesToSave, Is.EqualTo(new[] { "model.norm" }), "the changed norm travels whole");
        adapter.Save(Path.Combine(TempDir, "dc"), c);
        var back = PeftLoraAdapter.Load(Path.Combine(TempDir, "dc"), b);
        using var rebuilt = LlamaModel.FromTensors(device, c, (name, _) => b[name].Value.ToArray());
        back.MergeInto(rebuilt);
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(c))
        {
            string w = module + ".weight";
            var bw = b[w].Value.ToArray();
            var want = f[w].Value.ToArray().Select((v, i) => v - bw[i]).ToArray();
            var got = rebuilt[w].Value.ToArray().Select((v, i) => v - bw[i]).ToArray();
            double err = Math.Sqrt(want.Zip(got, (x, y) => (double)(x - y) * (x - y)).Sum()), norm = Math.Sqrt(want.Sum(x => (double)x * x));
            // Rank 4 for a rank-2 change: its two triplets at 8 and 4 bits, the rest (near zero) at 2: the error is the quantization's.
            Assert.That(err, Is.LessThan(0.25 * norm), $"{module}: the change is recovered up to quantization");
            Assert.That(err, Is.GreaterThan(0), $"{module}: and quantized");
        }

        Assert.That(rebuilt["model.norm.weight"].Value.ToArray(), Is.EqualTo(f["model.norm.weight"].Value.ToArray()));
        long fp16 = LoraAdapterConfig.LlamaLinearModules(c).Sum(m => (long)b[m + ".weight"].Value.Length) * 2;
        Assert.That(bytes, Is.LessThan(fp16), "smaller than the dense fp16 change");
        using var tied = LlamaModel.Create(device, LlamaConfig.Tiny with { NumHiddenLayers = 1 }, 1);
        using var tiedFine = BitDeltaCompressionTests.FineTuneOf(tied, 2);
        tiedFine["model.embed_tokens.weight"].Value.CopyFrom(tiedFine["model.embed_tokens.weight"].Value.ToArray().Select(v => v + 0.01f).ToArray());
        Assert.That(Assert.Throws<NotSupportedException>(() => DeltaCoMe.Compress(tied, tiedFine, 4))!.Message, Does.Contain("tied embedding"));
    }
}
