using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// mergekit's passthrough (layer stacking by slices), nuslerp, karcher and sce: each method against values worked
/// out by hand from mergekit's code, then each through a config on small models against the method called on the same
/// tensors, and the configs mergekit refuses (or silently ignores) refused by name.
/// </summary>
public sealed class MergekitMethodsTests : TempDirectoryTest
{
    private static readonly float Half = MathF.Sqrt(0.5f);

    [Test]
    public void Nuslerp_Karcher_Sce_MatchHandWorkedExamples()
    {
        // nuslerp: t = w1 / (w0 + w1); a quarter turn at t = 3/4 is (cos 3pi/8, sin 3pi/8).
        Assert.That(TaskVectorMerge.Nuslerp(null, new[] { 1f, 0f }, new[] { 0f, 1f }, 1, 1, true, false, 2), Is.EqualTo(new[] { Half, Half }).Within(1e-6f));
        Assert.That(TaskVectorMerge.Nuslerp(null, new[] { 1f, 0f }, new[] { 0f, 1f }, 1, 3, true, false, 2),
            Is.EqualTo(new[] { MathF.Cos(3 * MathF.PI / 8), MathF.Sin(3 * MathF.PI / 8) }).Within(1e-6f));
        Assert.That(TaskVectorMerge.Nuslerp(null, new[] { 1f, 0f }, new[] { 0f, 1f }, 1, -1, true, false, 2), Is.EqualTo(new[] { Half, Half }).Within(1e-6f),
            "weights summing to 0: t = 0.5");
        // A 2 x 2 tensor [[1, 0], [0, 2]] with [[0, 1], [0, 2]], three ways.
        float[] m0 = { 1, 0, 0, 2 }, m1 = { 0, 1, 0, 2 };
        float HalfAngle(double cos) => (float)(1 / (2 * Math.Sqrt((1 + cos) / 2))); // slerp at t = 1/2 is (v0 + v1) / (2 cos(theta / 2))
        Assert.That(TaskVectorMerge.Nuslerp(null, m0, m1, 1, 1, flatten: false, rowWise: false, 2), Is.EqualTo(new[] { Half, Half, 0, 2 }).Within(1e-6f),
            "rows: a quarter turn, and a colinear row lerped");
        float c1 = HalfAngle(2 / Math.Sqrt(5));
        Assert.That(TaskVectorMerge.Nuslerp(null, m0, m1, 1, 1, flatten: false, rowWise: true, 2), Is.EqualTo(new[] { Half, c1, 0, 4 * c1 }).Within(1e-6f),
            "columns: (1, 0) with (0, 0) (a zero norm clamped: a quarter turn), (0, 2) with (1, 2)");
        float f = HalfAngle(0.8);
        Assert.That(TaskVectorMerge.Nuslerp(null, m0, m1, 1, 1, flatten: true, rowWise: false, 2), Is.EqualTo(new[] { f, f, 0, 4 * f }).Within(1e-6f), "flattened");
        Assert.That(TaskVectorMerge.Nuslerp(new[] { 1f, 1f }, new[] { 2f, 1f }, new[] { 1f, 2f }, 1, 1, true, false, 2), Is.EqualTo(new[] { 1 + Half, 1 + Half }).Within(1e-6f),
            "with a base: base + slerp of the task vectors");

        // karcher: directions averaged on the sphere, scaled by the mean norm.
        Assert.That(TaskVectorMerge.Karcher(new[] { new[] { 2f, 0f }, new[] { 0f, 4f } }, 10, 1e-5), Is.EqualTo(new[] { 3 * Half, 3 * Half }).Within(1e-5f));
        // Directions at 0, 0 and 90 degrees: the start (their normalised mean) is at 26.6 degrees; one step reaches the
        // arc mean, 30 degrees.
        Assert.That(TaskVectorMerge.Karcher(new[] { new[] { 1f, 0f }, new[] { 1f, 0f }, new[] { 0f, 1f } }, 10, 1e-5),
            Is.EqualTo(new[] { MathF.Sqrt(3) / 2, 0.5f }).Within(1e-6f));
        Assert.That(TaskVectorMerge.Karcher(new[] { new[] { 1f, 0f }, new[] { 1f, 0f }, new[] { 0f, 1f } }, 0, 1e-5),
            Is.EqualTo(new[] { 2 / MathF.Sqrt(5), 1 / MathF.Sqrt(5) }).Within(1e-6f), "max_iter 0: the start");
        Assert.That(TaskVectorMerge.Karcher(new[] { new[] { 2f, 0f }, new[] { 0f, 0f } }, 10, 1e-5), Is.EqualTo(new[] { 1f, 0f }).Within(1e-6f),
            "a zero tensor takes no part in the direction but counts in the norm");

        // sce: weights mean(tau^2) normalised, entries against the majority sign erased.
        float[] zero = new float[3], t1 = { 1, -2, 3 }, t2 = { 3, 2, -2 };
        Assert.That(TaskVectorMerge.Sce(zero, new[] { t1, t2 }, 1), Is.EqualTo(new[] { 65f / 31, 2f, 3f }).Within(1e-6f),
            "weights 14/31 and 17/31; entry 1's sum is 0 (majority +), entry 2's is +1");
        Assert.That(TaskVectorMerge.Sce(zero, new[] { t1, t2 }, 0.5), Is.EqualTo(new[] { 0f, 0f, 3f }).Within(1e-6f),
            "variances 1, 4, 6.25: int(3 x 0.5) = 1 entry kept; the erased entries keep the base");
        Assert.That(TaskVectorMerge.Sce(new[] { 1f, 1f, 1f }, new[] { t1, t2 }, 0), Is.EqualTo(new[] { 1f, 1f, 1f }), "select_topk 0: nothing kept");
    }

    /// <summary>
    /// passthrough stacks layers: slice outputs are numbered on, each layer the source's layer from + j, the embeddings
    /// from the first slice and the final norm from the last; a slice-level scale with filters multiplies tensors
    /// (the o_proj-zeroing trick of self-merges); the stacked model saves with its new layer count and runs.
    /// </summary>
    [Test]
    public void Passthrough_StacksLayersFromSlices_WithScaleFilters()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var a = SavedAs(LlamaModel.Create(device, config, seed: 70), TempDir, "a");
        using var b = SavedAs(LlamaModel.Create(device, config, seed: 71), TempDir, "b");
        string yaml = """
            merge_method: passthrough
            slices:
              - sources:
                  - model: a
                    layer_range: [0, 2]
              - sources:
                  - model: b
                    layer_range: [1, 2]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0
                    - filter: down_proj
                      value: 0.5
            dtype: float32
            """;
        using var merged = MergeRunner.Run(MergeConfig.Parse(yaml, "p.yaml"), TempDir, device);
        Assert.That(merged.Config.NumHiddenLayers, Is.EqualTo(3));
        foreach (var p in merged.Parameters)
        {
            string name = p.Name;
            var got = p.Value.ToArray();
            float[] want = name.StartsWith("model.layers.2.", StringComparison.Ordinal) ? b[name.Replace("layers.2.", "layers.1.")].Value.ToArray()
                : name.StartsWith("model.norm.", StringComparison.Ordinal) ? b[name].Value.ToArray()
                : a[name].Value.ToArray();
            float scale = !name.StartsWith("model.layers.2.", StringComparison.Ordinal) ? 1 : name.Contains("o_proj") ? 0 : name.Contains("down_proj") ? 0.5f : 1;
            Assert.That(got, Is.EqualTo(want.Select(v => v * scale).ToArray()), name);
        }

        string folder = Path.Combine(TempDir, "stacked");
        HuggingFaceFolder.Save(merged, folder);
        using var reloaded = HuggingFaceFolder.Load(folder, device);
        Assert.That(reloaded.Config.NumHiddenLayers, Is.EqualTo(3));
        Assert.That(reloaded.Logits(new[] { 1, 2, 3 }, batch: 1).All(float.IsFinite), Is.True);

        foreach (var (bad, expected) in new[]
        {
            ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        parameters: {scale: 0}\n",
                "scale applies to the whole merge and mergekit does not read it from a model's parameters"),
            ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n",
                "passthrough copies exactly one source per slice; this one has 2"),
            ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [1, 3]\n", "layer_range [1, 3] goes past its 2 layers"),
            ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [2, 1]\n", "layer_range must be [from, to] with 0 <= from < to"),
            ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\nparameters: {weight: 0.5}\n", "passthrough takes no weight"),
        })
        {
            AssertMergeFails(device, TempDir, bad, expected);
        }
    }

    /// <summary>Saves <paramref name="model"/> as the folder <paramref name="name"/> in <paramref name="dir"/> (a merge's input) and returns it.</summary>
    internal static LlamaModel SavedAs(LlamaModel model, string dir, string name)
    {
        HuggingFaceFolder.Save(model, Path.Combine(dir, name));
        return model;
    }

    /// <summary>Writes <paramref name="yaml"/> as bad.yaml in <paramref name="dir"/> and asserts that parsing or running it fails naming <paramref name="expected"/>.</summary>
    internal static void AssertMergeFails(CpuDevice device, string dir, string yaml, string expected)
    {
        File.WriteAllText(Path.Combine(dir, "bad.yaml"), yaml);
        var e = Assert.Catch<Exception>(() =>
        {
            using var m = MergeRunner.Run(MergeConfig.Load(Path.Combine(dir, "bad.yaml")), dir, device);
        })!;
        Assert.That(e.Message, Does.Contain(expected), yaml);
    }

    /// <summary>
    /// A task-vector method over several slices: each slice is merged from its own sources, and a one-layer slice reads
    /// its gradients at depth 1 (mergekit's t for a slice of one layer); the embeddings take the first slice at depth 0.
    /// A slice without the base among its sources is refused (mergekit takes the base's tensors from the slice).
    /// </summary>
    [Test]
    public void TaskArithmetic_OverSlices_ReadsGradientsPerSlice()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = SavedAs(LlamaModel.Create(device, config, seed: 72), TempDir, "base");
        using var f = SavedAs(BitDeltaCompressionTests.FineTuneOf(b, 73, changeNorm: true), TempDir, "fine");
        string Slice(int from, string weight) =>
            $"  - sources:\n      - model: base\n        layer_range: [{from}, {from + 1}]\n      - model: fine\n        layer_range: [{from}, {from + 1}]\n" +
            $"    parameters: {{weight: {weight}}}\n";
        string yaml = "merge_method: task_arithmetic\nbase_model: base\nslices:\n" + Slice(0, "[0, 1]") + Slice(1, "0.5");
        using var merged = MergeRunner.Run(MergeConfig.Parse(yaml, "s.yaml"), TempDir, device);
        foreach (var (name, weight) in new[] { ("model.layers.0.self_attn.q_proj.weight", 1.0), ("model.layers.1.self_attn.q_proj.weight", 0.5), ("model.embed_tokens.weight", 0.0),
            ("model.norm.weight", 0.5) })
        {
            var bv = b[name].Value.ToArray();
            var fv = f[name].Value.ToArray();
            Assert.That(merged[name].Value.ToArray(), Is.EqualTo(bv.Select((x, i) => (float)(x + weight * ((double)fv[i] - x))).ToArray()), name);
        }

        var e = Assert.Throws<PeftSharpInputException>(() =>
            MergeConfig.Parse("merge_method: ties\nbase_model: base\nslices:\n  - sources:\n      - model: fine\n        layer_range: [0, 2]\n", "s.yaml"))!;
        Assert.That(e.Message, Does.Contain("the base_model 'base' is not among its sources"));
    }

    /// <summary>nuslerp, karcher and sce through configs: the merged tensors are the methods' on the same tensors, with the base where mergekit puts it.</summary>
    [Test]
    public void Nuslerp_Karcher_Sce_ThroughConfigs()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = SavedAs(LlamaModel.Create(device, config, seed: 74), TempDir, "b");
        using var x = SavedAs(BitDeltaCompressionTests.FineTuneOf(b, 75), TempDir, "x");
        using var y = SavedAs(BitDeltaCompressionTests.FineTuneOf(b, 76, changeNorm: true), TempDir, "y");
        const string W = "model.layers.1.mlp.down_proj.weight", N = "model.norm.weight";
        float[] V(LlamaModel m, string name) => m[name].Value.ToArray();
        LlamaModel Run(string yaml) => MergeRunner.Run(MergeConfig.Parse(yaml, "m.yaml"), TempDir, device);
        int cols = b[W].Value.Dim(1);

        const string Two = "models:\n  - model: x\n    parameters: {weight: 1}\n  - model: y\n    parameters: {weight: 3}\n";
        using (var m = Run("merge_method: nuslerp\nbase_model: b\n" + Two + "parameters: {nuslerp_flatten: false}\n"))
        {
            Assert.That(V(m, W), Is.EqualTo(TaskVectorMerge.Nuslerp(V(b, W), V(x, W), V(y, W), 1, 3, false, false, cols)));
            Assert.That(V(m, N), Is.EqualTo(TaskVectorMerge.Nuslerp(V(b, N), V(x, N), V(y, N), 1, 3, false, false, V(b, N).Length)));
        }

        using (var m = Run("merge_method: nuslerp\n" + Two + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"))
        {
            Assert.That(V(m, W), Is.EqualTo(TaskVectorMerge.Nuslerp(null, V(x, W), V(y, W), 1, 3, false, true, cols)), "no base: the models themselves");
        }

        using (var m = Run("merge_method: karcher\nbase_model: b\nmodels:\n  - model: x\n  - model: y\nparameters: {max_iter: 5, tol: 1e-6}\n"))
        {
            Assert.That(V(m, W), Is.EqualTo(TaskVectorMerge.Karcher(new[] { V(x, W), V(y, W), V(b, W) }, 5, (double)1e-6f)), "the base joins the mean, appended as mergekit does");
        }

        using (var m = Run("merge_method: sce\nbase_model: b\nmodels:\n  - model: x\n  - model: y\nparameters: {select_topk: 0.5}\n"))
        {
            Assert.That(V(m, W), Is.EqualTo(TaskVectorMerge.Sce(V(b, W), new[] { V(x, W), V(y, W) }, (double)0.5f)));
            Assert.That(V(m, W), Is.Not.EqualTo(TaskVectorMerge.Sce(V(b, W), new[] { V(x, W), V(y, W) }, 1)), "select_topk takes effect");
        }

        foreach (var (bad, expected) in new[]
        {
            ("merge_method: nuslerp\nmodels:\n  - model: x\n    parameters: {weight: 1}\n  - model: y\n", "nuslerp needs a weight for y"),
            ("merge_method: nuslerp\nbase_model: b\n" + Two + "  - model: b\n    parameters: {weight: 1}\n  - model: c\n    parameters: {weight: 1}\n",
                "exactly two models besides the base_model; given 3"),
            ("merge_method: sce\nmodels:\n  - model: x\n", "sce needs a base_model"),
            ("merge_method: sce\nbase_model: b\nmodels:\n  - model: x\nparameters: {normalize: true}\n", "sce takes no normalize (its options: select_topk, int8_mask)"),
            ("merge_method: karcher\nmodels:\n  - model: x\nparameters: {nuslerp_flatten: false}\n", "karcher takes no nuslerp_flatten"),
        })
        {
            Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse(bad, "bad.yaml"))!.Message, Does.Contain(expected), bad);
        }
    }
}
