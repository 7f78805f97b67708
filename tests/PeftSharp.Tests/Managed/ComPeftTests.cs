using NUnit.Framework;
using PeftSharp.Compression;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Managed;

/// <summary>ComPEFT: top-k by magnitude, signs, one magnitude per tensor; a sparse delta merged or served like any.</summary>
public sealed class ComPeftTests : TempDirectoryTest
{
    [Test]
    public void Ternarize_KeepsTheLargestBySign_AtTheirMeanMagnitude()
    {
        double[] tau = { 0.1, -3, 0, 2, -0.5, 1, 0, 0 };
        var (index, values) = ComPeft.Ternarize(tau, density: 0.375, alpha: 1f); // ceil(3): -3, 2, 1
        Assert.That(index, Is.EqualTo(new[] { 1, 3, 5 }));
        Assert.That(values, Is.EqualTo(new[] { -2f, 2f, 2f }), "mean |tau| over the kept entries is 2");
        Assert.That(ComPeft.Ternarize(tau, 0.375, 1.5f).Values, Is.EqualTo(new[] { -3f, 3f, 3f }), "alpha scales the magnitude");
        Assert.That(ComPeft.Ternarize(tau, 1.0, 1f).Index, Is.EqualTo(new[] { 0, 1, 3, 4, 5 }), "density 1 keeps every nonzero entry, never a zero");
        Assert.That(ComPeft.Ternarize(new[] { 1.0, -1, 1, -1 }, 0.5, 1f).Index, Is.EqualTo(new[] { 0, 1 }), "ties go to the lower index");
    }

    [Test]
    public void ComPeft_OfAFineTune_MergesAndServesAsASparseDelta()
    {
        using var device = new CpuDevice();
        var c = BitDeltaCompressionTests.Small;
        using var b = LlamaModel.Create(device, c, 80);
        using var f = BitDeltaCompressionTests.FineTuneOf(b, 81, changeNorm: true);
        var delta = ComPeft.Compress(b, f, density: 0.25);
        const string w = "model.layers.1.mlp.up_proj.weight";
        var tau = f[w].Value.ToArray().Select((v, i) => (double)v - b[w].Value.ToArray()[i]).ToArray();
        var expected = ComPeft.Ternarize(tau, 0.25, 1f);
        Assert.That(delta.Entries[w].Index, Is.EqualTo(expected.Index));
        Assert.That(delta.Entries[w].Values, Is.EqualTo(expected.Values));
        Assert.That(delta.Entries[w].Index, Has.Length.EqualTo((int)Math.Ceiling(0.25 * tau.Length)));
        Assert.That(delta.Entries.ContainsKey("model.norm.weight"), "a changed norm is compressed too");
        Assert.That(delta.Entries.ContainsKey("model.embed_tokens.weight"), Is.False, "an unchanged tensor is left out");

        delta.Save(Path.Combine(TempDir, "cp"), c);
        var back = SparseDelta.Load(Path.Combine(TempDir, "cp"), b);
        Assert.That(back.Method, Is.EqualTo("compeft"));
        using var merged = LlamaModel.FromTensors(device, c, (name, _) => b[name].Value.ToArray());
        back.MergeInto(merged);
        Assert.That(merged[w].Value.ToArray(), Is.EqualTo(b[w].Value.ToArray().Select((v, i) =>
            Array.IndexOf(expected.Index, i) is var j and >= 0 ? v + expected.Values[j] : v).ToArray()));

        using var set = new VariantSet(b);
        set.Add("compeft", back);
        int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };
        var rows = MixedBatch.Decode(b, set, prompts, new[] { -1, 0 });
        Check.Close(rows[1], MixedBatch.Alone(merged, prompts[1]), (2e-5, 2e-4), "served = merged");
        Check.Close(rows[0], MixedBatch.Alone(b, prompts[0]), (2e-5, 2e-4), "base row");
    }
}
