using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Data;
using PeftSharp.Training;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Managed;

public sealed class MergingTests : TempDirectoryTest
{
    private static float[] Merge(MergeMethod method, float[] b, float[][] models, MergeInput[] inputs, bool normalize, float lambda = 1f) =>
        TaskVectorMerge.Merge(method, b, models, inputs, normalize, lambda, seed: 1);

    [Test]
    public void TaskArithmeticLinearTiesBreadcrumbs_MatchHandComputedExamples()
    {
        var zero = new float[4];
        // Task arithmetic: base + lambda sum w tau = 0 + 2 * ([1,2,3,0] + 0.5 [3,-2,1,0]).
        Assert.That(Merge(MergeMethod.TaskArithmetic, zero, new[] { new[] { 1f, 2, 3, 0 }, new[] { 3f, -2, 1, 0 } }, new[] { new MergeInput(1), new MergeInput(0.5f) }, false, 2f),
            Is.EqualTo(new[] { 5f, 2, 7, 0 }));
        // Linear, normalised: (m1 + 3 m2) / 4.
        Assert.That(Merge(MergeMethod.Linear, null!, new[] { new[] { 4f, 0, 8, 1 }, new[] { 0f, 4, 0, 1 } }, new[] { new MergeInput(1), new MergeInput(3) }, true),
            Is.EqualTo(new[] { 1f, 3, 2, 1 }));
        // TIES: trim tau1 and tau2 to their top half by magnitude ([0,-2,0,4], [-3,0,2,0]), tau3 kept whole; elect signs by
        // the sum ([-1, -3, 1, 7] -> -, -, +, +); average the agreeing entries: [-3, (-2 - 1) / 2, 2, (4 + 3) / 2].
        var ties = Merge(MergeMethod.Ties, zero,
            new[] { new[] { 1f, -2, 0.5f, 4 }, new[] { -3f, 1.5f, 2, 0.1f }, new[] { 2f, -1, -1, 3 } },
            new[] { new MergeInput(1, 0.5f), new MergeInput(1, 0.5f), new MergeInput(1, 1f) }, true);
        Assert.That(ties, Is.EqualTo(new[] { -3f, -1.5f, 2, 3.5f }));
        // Breadcrumbs with gamma 0.1, density 0.5 over 10 entries: drop the largest one and the smallest four.
        var tau = new[] { 5f, -4, 3, -2, 1, 0.5f, -0.2f, 0.1f, 0.05f, 0.01f };
        var crumbs = Merge(MergeMethod.Breadcrumbs, new float[10], new[] { tau }, new[] { new MergeInput(1, 0.5f, 0.1f) }, false);
        Assert.That(crumbs, Is.EqualTo(new[] { 0f, -4, 3, -2, 1, 0.5f, 0, 0, 0, 0 }));
        // Equal magnitudes across a band edge are kept by position, whichever way the sort left them.
        Assert.That(TaskVectorMerge.KeepBand(new double[] { 1, -1, 2, 1, 1, -1 }, 0f, 0.5f), Is.EqualTo(new double[] { 1, -1, 2, 0, 0, 0 }));
        // DARE at density 1 drops nothing: dare_linear equals task arithmetic.
        var models = new[] { TestData.Uniform(50, 1), TestData.Uniform(50, 2) };
        var b = TestData.Uniform(50, 3);
        var inputs = new[] { new MergeInput(0.7f, 1f), new MergeInput(0.3f, 1f) };
        Assert.That(Merge(MergeMethod.DareLinear, b, models, inputs, false), Is.EqualTo(Merge(MergeMethod.TaskArithmetic, b, models, inputs, false)));
        // DARE at density 0.5: each entry of each task vector is dropped or doubled.
        var dare = TaskVectorMerge.Dare(new double[] { 1, 1, 1, 1, 1, 1, 1, 1 }, 0.5f, seed: 3);
        Assert.That(dare, Is.All.EqualTo(0.0).Or.EqualTo(2.0));
        Assert.That(TaskVectorMerge.LinesScale(0, 4, 0.2f, 1f), Is.EqualTo(0.2f));
        Assert.That(TaskVectorMerge.LinesScale(3, 4, 0.2f, 1f), Is.EqualTo(1f));
    }

    /// <summary>
    /// The parallel merge against the specification, bit for bit, for every method: sizes 1, odd, and several chunks
    /// of 16,384; "ties" data (few distinct task-vector magnitudes, zeros) puts the trims' band edges inside runs of
    /// equal magnitudes, where the position order decides.
    /// </summary>
    [TestCase(1, "plain")]
    [TestCase(37, "ties")]
    [TestCase(40_000, "plain")]
    [TestCase(40_000, "ties")]
    public void Merge_EqualsTheReference_BitForBit(int n, string data)
    {
        var b = TestData.Uniform(n, 5);
        var models = Enumerable.Range(0, 3).Select(m => TestData.Uniform(n, 6 + m)).ToArray();
        if (data == "ties")
        {
            models = models.Select((v, m) => v.Select((x, i) => i % 7 == m ? b[i] : b[i] + MathF.Round(x * 3f) / 4f).ToArray()).ToArray();
        }

        var inputs = new[] { new MergeInput(0.5f, 0.3f, 0.05f), new MergeInput(1f, 0.6f, 0.1f), new MergeInput(0.25f, 1f, 0f) };
        foreach (var method in Enum.GetValues<MergeMethod>().Where(m => !TaskVectorMerge.HasOwnForm(m))) // their own forms and tests
        {
            foreach (bool normalize in new[] { true, false })
            {
                foreach (bool? rescale in new bool?[] { null, true, false })
                {
                    var fast = TaskVectorMerge.Merge(method, b, models, inputs, normalize, 0.8f, seed: 9, rescale);
                    var reference = TaskVectorMerge.MergeReference(method, b, models, inputs, normalize, 0.8f, seed: 9, rescale);
                    Assert.That(fast, Is.EqualTo(reference), $"{method}, normalize {normalize}, rescale {rescale}");
                }
            }
        }
    }

    /// <summary>
    /// mergekit's sparsification as its current sparsify.py defines it: rescale (default on for DARE only) scales each
    /// sparsified task vector to its full L1 norm (rescaled_masked_tensor), not by 1 / density; without rescale the
    /// kept entries are the task vector's own; density 1 returns the task vector whole (Breadcrumbs' gamma too); and
    /// where gamma + density exceed 1, fewer of the largest entries are dropped so int(density n) stay.
    /// </summary>
    [Test]
    public void Mergekit_Rescale_IsL1Matching_AndBreadcrumbsCountsFollowMagnitudeOutliers()
    {
        const int n = 1000;
        var b = TestData.Uniform(n, 11);
        var model = TestData.Uniform(n, 12);
        var tau = model.Select((x, i) => (double)x - b[i]).ToArray();
        double l1 = tau.Sum(Math.Abs);
        var input = new[] { new MergeInput(1f, 0.3f) };
        var rescaled = Merge(MergeMethod.DareLinear, b, new[] { model }, input, false); // rescale defaults to true for DARE
        var kept = rescaled.Select((x, i) => (double)x - b[i]).ToArray();
        Assert.That(kept.Sum(Math.Abs), Is.EqualTo(l1).Within(1e-5 * l1), "L1 norm matched");
        Assert.That(kept.Count(x => x != 0), Is.InRange(230, 370), "about 30% kept");
        var plain = TaskVectorMerge.Merge(MergeMethod.DareLinear, b, new[] { model }, input, false, 1f, seed: 1, rescale: false);
        for (int i = 0; i < n; i++)
        {
            Assert.That(plain[i], Is.EqualTo(kept[i] == 0 ? b[i] : model[i]).Within(1e-6), "rescale false keeps the task vector's own entries, the same draws");
        }

        var ties = TaskVectorMerge.Merge(MergeMethod.Ties, b, new[] { model }, input, false, 1f, seed: 1, rescale: true);
        Assert.That(ties.Select((x, i) => Math.Abs((double)x - b[i])).Sum(), Is.EqualTo(l1).Within(1e-5 * l1), "rescale applies to TIES' trim when asked");

        var tenth = Enumerable.Range(0, 10).Select(i => (float)(10 - i)).ToArray(); // tau = 10, 9, ..., 1
        Assert.That(Merge(MergeMethod.Breadcrumbs, new float[10], new[] { tenth }, new[] { new MergeInput(1f, 1f, 0.2f) }, false), Is.EqualTo(tenth),
            "density 1: the task vector whole, gamma ignored");
        Assert.That(Merge(MergeMethod.Breadcrumbs, new float[10], new[] { tenth }, new[] { new MergeInput(1f, 0.9f, 0.3f) }, false),
            Is.EqualTo(new[] { 0f, 9, 8, 7, 6, 5, 4, 3, 2, 1 }), "gamma + density > 1: int(0.9 n) = 9 stay, so only one of the largest goes");

        string Yaml(string method, string extra) => $"merge_method: {method}\nbase_model: b\nmodels:\n  - model: m\n    parameters:\n      density: 0.5\n{extra}";
        Assert.That(MergeConfig.Parse(Yaml("dare_ties", ""), "c.yaml").Rescale, Is.True);
        Assert.That(MergeConfig.Parse(Yaml("ties", ""), "c.yaml").Rescale, Is.False);
        Assert.That(MergeConfig.Parse(Yaml("dare_linear", "parameters:\n  rescale: false\n"), "c.yaml").Rescale, Is.False);
        var zeroGamma = Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse(Yaml("breadcrumbs", "      gamma: 0\n"), "c.yaml"))!;
        Assert.That(zeroGamma.Message, Does.Contain("gamma 0").And.Contain("c.yaml"));
    }

    /// <summary>
    /// Band edges that fall exactly on the boundary between two magnitude classes (10 entries of |tau| = 1, then 90 of
    /// 0.5, 0.25 ...): the radix select must place rank 10 in the second class, not at the end of the first.
    /// </summary>
    [TestCase(0.1f, 0.5f)]
    [TestCase(0.1f, 0.2f)]
    [TestCase(0f, 0.3f)]
    public void MagnitudeBand_EdgesOnClassBoundaries_EqualKeepBand(float gamma, float density)
    {
        const int n = 100;
        var b = new float[n];
        var model = Enumerable.Range(0, n).Select(i => (i % 2 == 0 ? 1f : -1f) * (i < 10 ? 1f : i < 40 ? 0.5f : i < 70 ? 0.25f : 0.125f)).ToArray();
        var flags = TaskVectorMerge.MagnitudeBand(model, b, gamma, density);
        var kept = TaskVectorMerge.KeepBand(model.Select(v => (double)v).ToArray(), gamma, density);
        Assert.That(flags, Is.EqualTo(kept.Select(v => v != 0).ToArray()));
    }

    [Test]
    public void MergekitConfig_ReadsTheSchema_AndNamesEveryUnsupportedOption()
    {
        var c = MergeConfig.Parse("""
            merge_method: ties
            base_model: base
            models:
              - model: a
                parameters: {weight: 0.7, density: 0.4}
              - model: b
                parameters:
                  weight: 0.3
            parameters:
              normalize: false
              int8_mask: true
              density: 0.9
            dtype: bfloat16
            """, "merge.yaml");
        Assert.That(c.Method, Is.EqualTo(MergeMethod.Ties));
        Assert.That(c.Models.Select(m => m.Parameters), Is.EqualTo(new[] { new MergeInput(0.7f, 0.4f, 0.01f), new MergeInput(0.3f, 0.9f, 0.01f) }));
        Assert.That((c.Normalize, c.Lambda, c.Dtype), Is.EqualTo((false, 1f, "bfloat16")));
        Assert.That(MergeConfig.Parse("""{"merge_method": "linear", "models": [{"model": "x"}]}""", "merge.json").Normalize, Is.True, "JSON works; linear normalises by default");

        var e = Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("""
            merge_method: frankenstein
            base_model: base
            models:
              - model: a
                parameters: {weight: [{filter: mlp, value: [0.5, 1]}], select_topk: 0.1, color: red}
            """, "bad.yaml"))!;
        Assert.That(e.Message, Does.Contain("merge_method 'frankenstein' is not supported")
            .And.Contain("select_topk applies to the whole merge").And.Contain("option 'color' is not supported"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: linear\nslices: []\nmodels:\n  - model: a\n", "b.yaml"))!.Message,
            Does.Contain("give models or slices, not both"));
        var ties = Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\nparameters: {t: 0.5, filter_wise: true}\n",
            "t.yaml"))!;
        Assert.That(ties.Message, Does.Contain("ties takes no t").And.Contain("ties takes no filter_wise").And.Contain("its options: weight, density"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: ties\nmodels:\n  - model: a\n", "x.yaml"))!.Message, Does.Contain("ties needs a base_model"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: a\n", "u.yaml"))!.Message,
            Does.Contain("'union'"));
        Assert.That(MergeConfig.Parse("merge_method: linear\ntokenizer_source: a\nmodels:\n  - model: a\n", "t.yaml").TokenizerSource, Is.EqualTo("a"));
    }

    /// <summary>
    /// Per-model parameters given as lists are gradients over the layers, as mergekit reads them: a weight going
    /// [0, 1] leaves the first layer (and the embeddings, at depth 0) at the base and gives the last (and the final norm,
    /// at depth 1, as mergekit's post_weights) the whole task vector; a top-level list applies where a model gives no
    /// value; out_dtype names the written type.
    /// </summary>
    [Test]
    public void Mergekit_GradientParameters_InterpolateOverLayers_OutDtype()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = MergekitMethodsTests.SavedAs(LlamaModel.Create(device, config, seed: 50), TempDir, "base");
        using var f = MergekitMethodsTests.SavedAs(LlamaModel.Create(device, config, seed: 51), TempDir, "fine");
        int last = config.NumHiddenLayers - 1;
        foreach (var yaml in new[]
        {
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: fine\n    parameters:\n      weight: [0, 1]\nout_dtype: bfloat16\n",
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: fine\nparameters:\n  weight: [0, 1]\n",
        })
        {
            var parsed = MergeConfig.Parse(yaml, "g.yaml");
            Assert.That(parsed.Slices[0].Sources[0].Settings["weight"].Single().Values, Is.EqualTo(new[] { 0f, 1f }));
            using var merged = MergeRunner.Run(parsed, TempDir, device);
            foreach (var (name, weight) in new[] { ("model.layers.0.mlp.up_proj.weight", 0f), ($"model.layers.{last}.mlp.up_proj.weight", 1f), ("model.embed_tokens.weight", 0f),
                ("model.norm.weight", 1f) })
            {
                var bv = b[name].Value.ToArray();
                var fv = f[name].Value.ToArray();
                Assert.That(merged[name].Value.ToArray(), Is.EqualTo(bv.Select((x, i) => (float)(x + weight * ((double)fv[i] - x))).ToArray()), $"{name}: weight {weight}");
            }
        }

        Assert.That(MergeConfig.Parse("merge_method: linear\nmodels:\n  - model: a\nout_dtype: float16\n", "o.yaml").Dtype, Is.EqualTo("float16"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: linear\nmodels:\n  - model: a\nout_dtype: int8\n", "o.yaml"))!.Message,
            Does.Contain("out_dtype 'int8'"));
    }

    /// <summary>
    /// model_stock as mergekit computes it: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the
    /// fine-tunes' offsets, then t mean(w_i) + (1 - t) w_0; flattened by default, per output row with filter_wise.
    /// </summary>
    [Test]
    public void ModelStock_AsMergekit_FlatOrPerRow()
    {
        double c = Math.Sqrt(0.5), t = 2 * c / (1 + c);
        var flat = TaskVectorMerge.ModelStock(new float[2], new[] { new[] { 1f, 0f }, new[] { 1f, 1f } }, filterWise: false, rowLength: 2);
        Assert.That(flat, Is.EqualTo(new[] { (float)t, (float)(t * 0.5) }).Within(1e-6f), "offsets at 45 degrees");
        Assert.That(TaskVectorMerge.ModelStock(new[] { 1f, 1f }, new[] { new[] { 2f, 1f }, new[] { 1f, 2f } }, false, 2), Is.EqualTo(new[] { 1f, 1f }), "orthogonal offsets: t = 0, the base");
        Assert.That(TaskVectorMerge.ModelStock(new float[2], new[] { new[] { 3f, 1f }, new[] { 3f, 1f } }, false, 2), Is.EqualTo(new[] { 3f, 1f }), "one direction: t = 1, the average");
        // filter_wise: row 0's offsets agree (t = 1), row 1's are orthogonal (t = 0).
        var rows = TaskVectorMerge.ModelStock(new float[4], new[] { new[] { 1f, 0f, 1f, 0f }, new[] { 1f, 0f, 0f, 1f } }, filterWise: true, rowLength: 2);
        Assert.That(rows, Is.EqualTo(new[] { 1f, 0f, 0f, 0f }));
        var cfg = MergeConfig.Parse("merge_method: model_stock\nbase_model: b\nmodels:\n  - model: x\n  - model: y\nparameters:\n  filter_wise: true\n", "s.yaml");
        Assert.That((cfg.Method, cfg.FilterWise), Is.EqualTo((MergeMethod.ModelStock, true)));
        using (var device = new CpuDevice())
        {
            var config = BitDeltaCompressionTests.Small;
            using var b = LlamaModel.Create(device, config, seed: 60);
            using var x = BitDeltaCompressionTests.FineTuneOf(b, 61);
            using var y = BitDeltaCompressionTests.FineTuneOf(b, 62);
            foreach (var (model, name) in new[] { (b, "b"), (x, "x"), (y, "y") }) HuggingFaceFolder.Save(model, Path.Combine(TempDir, name));
            using var merged = MergeRunner.Run(cfg, TempDir, device);
            const string w = "model.layers.1.self_attn.o_proj.weight";
            Assert.That(merged[w].Value.ToArray(), Is.EqualTo(TaskVectorMerge.ModelStock(b[w].Value.ToArray(), new[] { x[w].Value.ToArray(), y[w].Value.ToArray() }, true,
                b[w].Value.Dim(1))));
        }

        Assert.That(Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse("merge_method: model_stock\nbase_model: b\nmodels:\n  - model: x\n", "s.yaml"))!.Message,
            Does.Contain("at least two other models"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() =>
            MergeConfig.Parse("merge_method: model_stock\nbase_model: b\nmodels:\n  - model: x\n    parameters: {weight: 0.5}\n  - model: y\n", "s.yaml"))!.Message, Does.Contain("takes no weight"));
    }

    /// <summary>
    /// DELLA's MagPrune: within each row, the smallest-magnitude entries are kept with probability density - epsilon
    /// and the largest with density + epsilon, linearly by rank; della elects signs (normalize on), della_linear
    /// does not; both rescale by L1 by default; an epsilon that pushes a probability outside (0, 1) is refused.
    /// </summary>
    [Test]
    public void Della_KeepsByMagnitudeRank_WithMergekitsDefaults()
    {
        const int n = 20_000;
        var b = new float[n];
        var model = Enumerable.Range(0, n).Select(i => (float)(i + 1)).ToArray(); // |tau| rises with the index
        var keep = TaskVectorMerge.DellaKeep(model, b, 0.5f, 0.2f, rowLength: 0, seed: 3)!;
        double Kept(int from, int to) => (double)Enumerable.Range(from, to - from).Count(i => keep[i]) / (to - from);
        Assert.That(Kept(0, n / 10), Is.EqualTo(0.31).Within(0.03), "smallest tenth: about density - 0.9 epsilon");
        Assert.That(Kept(n - n / 10, n), Is.EqualTo(0.69).Within(0.03), "largest tenth: about density + 0.9 epsilon");
        Assert.That(Kept(0, n), Is.EqualTo(0.5).Within(0.02));
        var rows = TaskVectorMerge.DellaKeep(model, b, 0.5f, 0.2f, rowLength: 100, seed: 3)!;
        Assert.That(Enumerable.Range(0, n / 100).Select(r => rows[r * 100 + 99] ? 1 : 0).Average(), Is.EqualTo(0.7).Within(0.1), "ranked per row: each row's largest at 0.7");
        Assert.That(TaskVectorMerge.DellaKeep(model, b, 1f, 0.2f, 0, 1), Is.Null, "density 1 keeps everything");
        Assert.Throws<ArgumentException>(() => TaskVectorMerge.DellaKeep(model, b, 0.9f, 0.15f, 0, 1));

        string Yaml(string method) => $"merge_method: {method}\nbase_model: b\nmodels:\n  - model: m\n    parameters: {{density: 0.5, epsilon: 0.1}}\n";
        var della = MergeConfig.Parse(Yaml("della"), "d.yaml");
        Assert.That((della.Method, della.Normalize, della.Rescale, della.Models[0].Parameters.Epsilon), Is.EqualTo((MergeMethod.Della, true, true, 0.1f)));
        var linear = MergeConfig.Parse(Yaml("della_linear"), "d.yaml");
        Assert.That((linear.Normalize, linear.Rescale), Is.EqualTo((false, true)));
    }

    /// <summary>The config with its first layer_range cut to [0, 1] (a slice that is not the whole model).</summary>
    private static string ShortFirstRange(string yaml, int layers)
    {
        string whole = $"[0, {layers}]";
        int at = yaml.IndexOf(whole, StringComparison.Ordinal);
        return yaml[..at] + "[0, 1]" + yaml[(at + whole.Length)..];
    }

    /// <summary>
    /// slerp as mergekit computes it: the sin-weighted interpolation of the flattened tensors (lerp when nearly
    /// parallel), t per tensor from filtered entries and gradients read over the layers (layer i of L at depth
    /// i / (L - 1), embeddings and the head at 0), written as most slerp configs are (one slice over whole models).
    /// </summary>
    [Test]
    public void Slerp_AsMergekit_FilteredGradientsOverLayers_OneSliceConfigs()
    {
        var e0 = new[] { 1f, 0f };
        var e1 = new[] { 0f, 1f };
        Assert.That(TaskVectorMerge.Slerp(e0, e1, 0.5), Is.EqualTo(new[] { MathF.Sqrt(0.5f), MathF.Sqrt(0.5f) }).Within(1e-6f), "a quarter turn halved");
        Assert.That(TaskVectorMerge.Slerp(new[] { 2f, 0f }, new[] { 0f, 4f }, 1.0 / 3), Is.EqualTo(new[] { 2 * MathF.Cos(MathF.PI / 6), 4 * MathF.Sin(MathF.PI / 6) }).Within(1e-5f),
            "the weights sin((1 - t) theta) / sin theta and sin(t theta) / sin theta apply to the unnormalised tensors");
        Assert.That(TaskVectorMerge.Slerp(new[] { 1f, 2f }, new[] { 2f, 4.0001f }, 0.25), Is.EqualTo(new[] { 1.25f, 2.500025f }).Within(1e-5f), "nearly parallel: lerp");
        Assert.That(new MergeSetting(null, new[] { 0f, 0.5f, 1f }).At(0.25), Is.EqualTo(0.25).Within(1e-12));
        Assert.That(new MergeSetting(null, new[] { 0.2f, 1f }).At(1), Is.EqualTo(1).Within(1e-12));

        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = MergekitMethodsTests.SavedAs(LlamaModel.Create(device, config, seed: 40), TempDir, "base");
        using var f = MergekitMethodsTests.SavedAs(LlamaModel.Create(device, config, seed: 41), TempDir, "other");
        int layers = config.NumHiddenLayers;
        string yaml = $$"""
            slices:
              - sources:
                  - model: base
                    layer_range: [0, {{layers}}]
                  - model: other
                    layer_range: [0, {{layers}}]
            merge_method: slerp
            base_model: base
            parameters:
              t:
                - filter: self_attn
                  value: [0, 0.5, 0.3, 0.7, 1]
                - filter: mlp
                  value: [1, 0.5, 0.7, 0.3, 0]
                - value: 0.4
            dtype: float32
            """;
        File.WriteAllText(Path.Combine(TempDir, "slerp.yaml"), yaml);
        var parsed = MergeConfig.Load(Path.Combine(TempDir, "slerp.yaml"));
        Assert.That((parsed.Method, parsed.Settings["t"].Count, parsed.Models.Count), Is.EqualTo((MergeMethod.Slerp, 3, 2)));
        using var merged = MergeRunner.Run(parsed, TempDir, device);
        foreach (var (name, t) in new[]
        {
            ("model.embed_tokens.weight", (double)0.4f), // t as the YAML's number was read (a float)
            ($"model.layers.{layers - 1}.self_attn.q_proj.weight", 1.0),
            ("model.layers.0.mlp.up_proj.weight", 1.0),
            ("model.layers.0.input_layernorm.weight", (double)0.4f),
            ("model.norm.weight", (double)0.4f),
        })
        {
            Assert.That(merged[name].Value.ToArray(), Is.EqualTo(TaskVectorMerge.Slerp(b[name].Value.ToArray(), f[name].Value.ToArray(), t)), name);
        }

        if (layers > 2)
        {
            double depth = 1.0 / (layers - 1);
            var mid = new MergeSetting("self_attn", new[] { 0f, 0.5f, 0.3f, 0.7f, 1f }).At(depth);
            Assert.That(merged["model.layers.1.self_attn.v_proj.weight"].Value.ToArray(), Is.EqualTo(TaskVectorMerge.Slerp(b["model.layers.1.self_attn.v_proj.weight"].Value.ToArray(),
                f["model.layers.1.self_attn.v_proj.weight"].Value.ToArray(), mid)));
        }

        foreach (var (bad, expected) in new[]
        {
            (ShortFirstRange(yaml, layers), "the same number of layers: base layer_range [0, 1] (1 layers)"),
            ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: other\n", "slerp needs parameters.t"),
            ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: other\n  - model: third\nparameters:\n  t: 0.5\n", "the base_model and one other"),
            ("merge_method: ties\nbase_model: base\nmodels:\n  - model: other\nparameters:\n  t: 0.5\n", "ties takes no t"),
        })
        {
            MergekitMethodsTests.AssertMergeFails(device, TempDir, bad, expected);
        }
    }

    [Test]
    public void PeftMergeConfig_MergesModelsAdaptersAndDeltas_AsTheMethodPrescribes()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = LlamaModel.Create(device, config, seed: 30);
        using var fa = BitDeltaCompressionTests.FineTuneOf(b, 31);
        using var fb = BitDeltaCompressionTests.FineTuneOf(b, 32);
        string dir = TempDir;
        HuggingFaceFolder.Save(b, Path.Combine(dir, "base"));
        HuggingFaceFolder.Save(fa, Path.Combine(dir, "a"));
        SparseDelta.Between(b, fb).Save(Path.Combine(dir, "b-sparse"), config); // a sparse delta input, densified onto the base
        // The base's tokenizer files travel to the merged folder (mergekit's default tokenizer_source: base).
        string tokenizerJson = Path.Combine(TestContext.CurrentContext.TestDirectory, "Fixtures", "Tokenizers", "gpt2_style", "tokenizer.json");
        File.Copy(tokenizerJson, Path.Combine(dir, "base", "tokenizer.json"));
        File.WriteAllText(Path.Combine(dir, "merge.yaml"), """
            merge_method: ties
            base_model: base
            models:
              - model: a
                parameters: {weight: 0.6, density: 0.3}
              - model: b-sparse
                parameters: {weight: 0.4, density: 0.3}
            parameters: {lambda: 0.9}
            """);
        var r = PeftSharp.Tests.Host.Peft.Run("merge", "--config", Path.Combine(dir, "merge.yaml"), "--out", Path.Combine(dir, "merged"), "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("merged 2 models by ties"));
        Assert.That(File.ReadAllBytes(Path.Combine(dir, "merged", "tokenizer.json")), Is.EqualTo(File.ReadAllBytes(tokenizerJson)));
        using var merged = HuggingFaceFolder.Load(Path.Combine(dir, "merged"), device);
        foreach (var name in new[] { "model.layers.1.mlp.down_proj.weight", "model.norm.weight" })
        {
            var expected = TaskVectorMerge.Merge(MergeMethod.Ties, b[name].Value.ToArray(), new[] { fa[name].Value.ToArray(), fb[name].Value.ToArray() },
                new[] { new MergeInput(0.6f, 0.3f), new MergeInput(0.4f, 0.3f) }, true, 0.9f, seed: 0);
            Check.Close(merged[name].Value.ToArray(), expected, (1e-7, 1e-6), name);
        }

        var trimmed = merged["model.layers.1.mlp.down_proj.weight"].Value.ToArray().Zip(b["model.layers.1.mlp.down_proj.weight"].Value.ToArray()).Count(p => p.First == p.Second);
        Assert.That(trimmed, Is.GreaterThan(0), "TIES left some entries at the base (trimmed by both inputs)");
        r = PeftSharp.Tests.Host.Peft.Run("merge", "--config", Path.Combine(dir, "missing.yaml"), "--out", Path.Combine(dir, "x"));
        Assert.That(r.Code, Is.EqualTo(2));
    }

    /// <summary>
    /// mergekit's semantics where they differ from a naive reading: TIES elects signs over the weighted task vectors,
    /// so a negative weight flips a model's vote (mergekit's get_mask on w_i tau_i; majority +1 on a zero sum), the
    /// normalising divisor is kept at 1 when the agreeing weights sum to zero, normalize defaults to false for
    /// dare_ties and breadcrumbs_ties, and a base model also listed under models is skipped.
    /// </summary>
    [Test]
    public void Mergekit_SignElectionNormalizeDefaultsAndBaseInModels()
    {
        var zero = new float[3];
        // tau1 = [2, 1, 0], tau2 = [1, 3, 1], weights 1 and -1: w tau = [2, 1, 0] and [-1, -3, -1], sums [1, -2, -1].
        // Entry 0: majority +, only model 1 agrees: 2 / 1. Entry 1: majority -, only model 2: -3 / -1 = 3.
        // Entry 2: majority -, model 2 agrees (w tau = -1), model 1's 0 does not: -1 / -1 = 1.
        var models = new[] { new[] { 2f, 1, 0 }, new[] { 1f, 3, 1 } };
        var inputs = new[] { new MergeInput(1f), new MergeInput(-1f) };
        Assert.That(Merge(MergeMethod.Ties, zero, models, inputs, true), Is.EqualTo(new[] { 2f, 3, 1 }));
        Assert.That(TaskVectorMerge.MergeReference(MergeMethod.Ties, zero, models, inputs, true, 1f, 1), Is.EqualTo(new[] { 2f, 3, 1 }));
        Assert.That(Merge(MergeMethod.Ties, zero, models, inputs, false), Is.EqualTo(new[] { 2f, -3, -1 }), "unnormalised: the agreeing w tau summed");
        // A zero sum elects +: w tau = [1] and [-1] -> the positive one alone.
        Assert.That(Merge(MergeMethod.Ties, new float[1], new[] { new[] { 1f }, new[] { -1f } }, new[] { new MergeInput(1f), new MergeInput(1f) }, true), Is.EqualTo(new[] { 1f }));
        // Weights summing to zero in a normalised task arithmetic leave the weighted sum undivided (mergekit's guard).
        Assert.That(Merge(MergeMethod.TaskArithmetic, zero, models, inputs, true), Is.EqualTo(new[] { 1f, -2, -1 }));

        string Config(string method) => $"merge_method: {method}\nbase_model: base\nmodels:\n  - model: a\n";
        Assert.That(MergeConfig.Parse(Config("ties"), "m.yaml").Normalize, Is.True);
        Assert.That(MergeConfig.Parse(Config("dare_ties"), "m.yaml").Normalize, Is.False);
        Assert.That(MergeConfig.Parse(Config("breadcrumbs_ties"), "m.yaml").Normalize, Is.False);
        Assert.That(MergeConfig.Parse(Config("task_arithmetic"), "m.yaml").Normalize, Is.False);

        // The base listed under models as well: skipped, so a normalised task arithmetic of (base, a) at weights 1 and 1 is
        // base + tau_a (counted, the base's zero task vector would halve it).
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = LlamaModel.Create(device, config, seed: 50);
        using var fa = BitDeltaCompressionTests.FineTuneOf(b, 51);
        HuggingFaceFolder.Save(b, Path.Combine(TempDir, "base"));
        HuggingFaceFolder.Save(fa, Path.Combine(TempDir, "a"));
        File.WriteAllText(Path.Combine(TempDir, "listed.yaml"), "merge_method: task_arithmetic\nbase_model: base\nparameters: {normalize: true}\n" +
            "models:\n  - model: base\n    parameters: {weight: 1.0}\n  - model: a\n    parameters: {weight: 1.0}\n");
        using var merged = MergeRunner.Run(MergeConfig.Load(Path.Combine(TempDir, "listed.yaml")), TempDir, device);
        const string name = "model.layers.0.mlp.up_proj.weight";
        Check.Close(merged[name].Value.ToArray(), fa[name].Value.ToArray(), (1e-7, 1e-6), "normalised task arithmetic of (base, a) with the base skipped is a");
    }

    [Test]
    public void SparseDeltas_DisjointOnesComposeToTheirSum_FolderRoundTrips_WrongBaseIsRejected()
    {
        using var device = new CpuDevice();
        var config = BitDeltaCompressionTests.Small;
        using var b = LlamaModel.Create(device, config, seed: 40);
        using var f = BitDeltaCompressionTests.FineTuneOf(b, 41);
        const string name = "model.layers.0.mlp.up_proj.weight";
        int numel = b[name].Value.Length;
        var d1 = SparseDelta.Between(b, f, new Dictionary<string, int[]> { [name] = Enumerable.Range(0, numel).Where(i => i % 3 == 0).ToArray() });
        var d2 = SparseDelta.Between(b, f, new Dictionary<string, int[]> { [name] = Enumerable.Range(0, numel).Where(i => i % 3 == 1).ToArray() });
        using var seq = LlamaModel.FromTensors(device, config, (n, _) => b[n].Value.ToArray());
        d1.ApplyTo(seq);
        d2.ApplyTo(seq);
        using var summed = LlamaModel.FromTensors(device, config, (n, _) => b[n].Value.ToArray());
        var sum = d1.Add(d2);
        Assert.That(sum.Nonzeros, Is.EqualTo(d1.Nonzeros + d2.Nonzeros), "disjoint: the union");
        sum.ApplyTo(summed);
        Assert.That(summed[name].Value.ToArray(), Is.EqualTo(seq[name].Value.ToArray()));
        var fine = f[name].Value.ToArray();
        var got = summed[name].Value.ToArray();
        var baseW = b[name].Value.ToArray();
        for (int i = 0; i < numel; i++) Assert.That(got[i], i % 3 == 2 ? Is.EqualTo(baseW[i]) : Is.EqualTo(fine[i]).Within(1e-7f), $"entry {i}");

        string dir = Path.Combine(TempDir, "sparse");
        sum.Save(dir, config);
        var back = SparseDelta.Load(dir, b);
        Assert.That(back.Entries[name].Index, Is.EqualTo(sum.Entries[name].Index));
        Assert.That(back.Entries[name].Values, Is.EqualTo(sum.Entries[name].Values));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => SparseDelta.Load(dir, f))!.Message, Does.Contain("only applies to its own base"));
    }
}

public sealed class SparseFinetuneTests
{
    [Test]
    public void MaskedAdamW_TrainsOnlyTheMask_WithStateForTheMaskAlone_AndGradientMasksPickTheLargestGradients()
    {
        using var device = new CpuDevice();
        var config = LoraTrainingTests.Micro;
        using var model = LlamaModel.Create(device, config, seed: 50);
        var tokens = LoraTrainingTests.Tokens;
        var targets = LoraTrainingTests.Targets;
        var masks = PeftSharp.Training.SparseMasks.Select(model, 0.05, PeftSharp.Training.MaskSource.Gradient, seed: 1, new[] { (tokens, targets) }, batchSize: 2);
        // The gradient mask of a tensor holds its largest |gradient| entries.
        model.ZeroGrad();
        model.Loss(tokens, targets, 2, backward: true);
        const string name = "model.layers.1.mlp.down_proj.weight";
        var g = model[name].Grad.ToArray().Select(Math.Abs).ToArray();
        float threshold = masks[name].Min(i => g[i]);
        Assert.That(Enumerable.Range(0, g.Length).Where(i => !masks[name].Contains(i)).All(i => g[i] <= threshold), "no unmasked entry has a larger gradient");

        var before = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        using var opt = new PeftSharp.Training.MaskedAdamW(model.AllParameters, masks);
        long nnz = masks.Values.Sum(m => (long)m.Length);
        Assert.That(opt.StateFloats, Is.EqualTo(2 * nnz));
        Assert.That(nnz, Is.LessThan(model.ParameterCount / 10));
        for (int s = 0; s < 3; s++)
        {
            model.ZeroGrad();
            model.Loss(tokens, targets, 2, backward: true);
            opt.Step(1e-2f);
        }

        foreach (var p in model.Parameters)
        {
            var now = p.Value.ToArray();
            var masked = masks[p.Name].ToHashSet();
            for (int i = 0; i < now.Length; i++)
            {
                if (!masked.Contains(i)) Assert.That(now[i], Is.EqualTo(before[p.Name][i]), $"{p.Name}[{i}] is outside the mask");
            }

            Assert.That(masks[p.Name].Any(i => now[i] != before[p.Name][i]), $"{p.Name}: the masked entries moved");
        }
    }
}

public sealed class GraftingTests
{
    [Test]
    public void Localize_StaysWithinTheBudget_GraftsFineTunedValues_AndLowersTheTaskLossBelowTheLargestChangesMask()
    {
        using var device = new CpuDevice();
        var config = LoraTrainingTests.Micro;
        using var b = LlamaModel.Create(device, config, seed: 60);
        using var f = BitDeltaCompressionTests.FineTuneOf(b, 61, size: 0.3f);
        var batches = new[] { (LoraTrainingTests.Tokens, LoraTrainingTests.Targets) };
        var noSteps = PeftSharp.Training.Grafting.Localize(b, f, batches, 2, budget: 0.05, steps: 0);
        var tuned = PeftSharp.Training.Grafting.Localize(b, f, batches, 2, budget: 0.05, steps: 20);
        long total = b.ParameterCount;
        Assert.That(tuned.Entries, Is.EqualTo((long)Math.Round(0.05 * total)));
        Assert.That(tuned.Delta.Nonzeros, Is.EqualTo(tuned.Entries));
        Assert.That(noSteps.LossAfter, Is.EqualTo(noSteps.LossBefore), "zero steps keep the |delta| mask");
        TestContext.Out.WriteLine($"task loss with the largest changes grafted {noSteps.LossAfter:F4}, after mask steps {tuned.LossAfter:F4}");
        Assert.That(tuned.LossAfter, Is.LessThan(noSteps.LossAfter), "optimising the mask lowers the task loss");
        const string name = "model.layers.0.mlp.up_proj.weight";
        if (tuned.Delta.Entries.TryGetValue(name, out var e))
        {
            var fv = f[name].Value.ToArray();
            var bv = b[name].Value.ToArray();
            for (int j = 0; j < e.Index.Length; j++) Assert.That(bv[e.Index[j]] + e.Values[j], Is.EqualTo(fv[e.Index[j]]).Within(1e-6f));
        }
    }
}

public sealed class SkillLocalizationTests
{
    /// <summary>
    /// Grafting recovers most of a fine-tune's held-out accuracy on the built-in tasks, in the setting skill
    /// localization is about: the pre-trained model can sort, and an SGD fine-tune teaches it 'sort' under a tag it has
    /// never seen ('sort@~'); 1% of the fine-tune's entries, chosen by the mask optimisation, are grafted onto the
    /// pre-trained model. Stated target: the grafted model keeps at least half of the fine-tune's gain in exact match
    /// over the pre-trained model on held-out prompts, and far more than the same number of largest changes (no mask
    /// steps). Measured while choosing it: 1% kept 64% exact match of 97% (0.1%: 45%); a new skill ('reverse', unseen in
    /// pre-training) does not localize in a model this small (0-8% at 0.1-1%), so that is not what is asked here.
    /// </summary>
    [Test]
    public void Grafting_OnePercent_KeepsMostOfAFineTunesGain_OnATaskUnderANewTag()
    {
        using var device = new CpuDevice();
        using var pre = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 3);
        string[] pretrainTasks = { "sort", "copy", "reverse" };
        Train(pre, pretrainTasks, new AdamW(pre.Parameters), steps: 1000, lr: 3e-3f, seed: 3);
        var held = TaskSuite.Stream(new[] { "sort@~" }, 77, Split.HeldOut).Take(60).ToList();
        var sortHeld = TaskSuite.Stream(new[] { "sort" }, 77, Split.HeldOut).Take(60).ToList();
        double preSort = Evaluator.Evaluate(pre, sortHeld, 40).ExactMatch;
        double before = Evaluator.Evaluate(pre, held, 40).ExactMatch;

        using var fine = LlamaModel.FromTensors(device, pre.Config, (n, _) => pre[n].Value.ToArray());
        Train(fine, new[] { "sort@~" }, new Sgd(fine.Parameters, momentum: 0.9f), steps: 300, lr: 0.1f, seed: 4, completionOnly: true);
        double after = Evaluator.Evaluate(fine, held, 40).ExactMatch;

        var batches = ExampleSource.Tasks(new[] { "sort@~" }, 5, Split.Train).EncodeBatches(pre.Tokenizer, 8, 16, 40, completionOnly: true, rewind: false);
        double Grafted(int steps)
        {
            var graft = Grafting.Localize(pre, fine, batches, 16, budget: 0.01, steps: steps);
            using var g = LlamaModel.FromTensors(device, pre.Config, (n, _) => pre[n].Value.ToArray());
            graft.Delta.ApplyTo(g);
            return Evaluator.Evaluate(g, held, 40).ExactMatch;
        }

        double largest = Grafted(0), grafted = Grafted(100);
        TestContext.Out.WriteLine($"pre-trained: sort {preSort:P0}, sort@~ {before:P0}; SGD fine-tune {after:P0}; grafted 1%: largest changes {largest:P0}, optimised mask {grafted:P0}");
        Assert.That(after - before, Is.GreaterThan(0.3), "the fine-tune must learn the new tag for the test to mean anything");
        Assert.That(grafted - before, Is.GreaterThanOrEqualTo(0.5 * (after - before)), "grafting 1% keeps at least half of the fine-tune's gain");
        Assert.That(grafted, Is.GreaterThan(largest), "the optimised mask beats the largest changes");
    }

    private static void Train(LlamaModel model, string[] tasks, Optimizer opt, int steps, float lr, int seed, bool completionOnly = false)
    {
        using (opt)
        {
            var options = new TrainOptions { Steps = steps, BatchSize = 16, SeqLen = 40, LearningRate = lr, WarmupSteps = 20, Seed = seed, CompletionOnly = completionOnly };
            new TrainingRun(model, opt, new LearningRateSchedule.Warmup(lr, 20, steps, true, lr / 10), ExampleSource.Tasks(tasks, seed, Split.Train), options).Run(null);
        }
    }
}

public sealed class SparseRegrowTests
{
    [Test]
    public void Regrow_KeepsTheBudget_SwapsEntries_AndResetsDroppedOnesToTheirStart()
    {
        using var device = new CpuDevice();
        var config = LoraTrainingTests.Micro;
        using var model = LlamaModel.Create(device, config, seed: 70);
        var start = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        var masks = PeftSharp.Training.SparseMasks.Select(model, 0.1, PeftSharp.Training.MaskSource.Random, seed: 2);
        using var opt = new PeftSharp.Training.MaskedAdamW(model.AllParameters, masks);
        var regrow = new PeftSharp.Training.SparseRegrow(opt, every: 2, dropFraction: 0.25f);
        for (int step = 1; step <= 4; step++)
        {
            model.ZeroGrad();
            model.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
            opt.Step(1e-2f);
            regrow.AfterStep(step);
        }

        var now = opt.Masks;
        Assert.That(regrow.Regrown, Is.GreaterThan(0));
        foreach (var p in model.Parameters)
        {
            Assert.That(now[p.Name], Has.Length.EqualTo(masks[p.Name].Length), $"{p.Name}: the budget holds");
            Assert.That(now[p.Name].Distinct().Count(), Is.EqualTo(now[p.Name].Length));
            var w = p.Value.ToArray();
            var inMask = now[p.Name].ToHashSet();
            for (int i = 0; i < w.Length; i++)
            {
                if (!inMask.Contains(i)) Assert.That(w[i], Is.EqualTo(start[p.Name][i]), $"{p.Name}[{i}] is outside the final mask, so at its start value");
            }
        }

        Assert.That(model.Parameters.Any(p => !now[p.Name].SequenceEqual(masks[p.Name])), "some masks moved");
    }

    /// <summary>
    /// The device-side regrow against the rule written out on the host over whole tensors (the plain form: drop the
    /// masked entries changed least from the start, grow the unmasked ones with the largest summed |gradient|, ties
    /// by index): the same masks and the same weights, bit for bit. Gradient-magnitude masks and a weight that
    /// stays put (the tied-at-zero sums of never-touched entries) both occur here.
    /// </summary>
    [Test]
    public void Regrow_EqualsThePlainHostRule()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LoraTrainingTests.Micro, seed: 71);
        using var twin = LlamaModel.Create(device, LoraTrainingTests.Micro, seed: 71);
        var masks = PeftSharp.Training.SparseMasks.Select(model, 0.05, PeftSharp.Training.MaskSource.Weight, seed: 3);
        using var opt = new PeftSharp.Training.MaskedAdamW(model.AllParameters, masks);
        using var twinOpt = new PeftSharp.Training.MaskedAdamW(twin.AllParameters, masks);
        using var regrow = new PeftSharp.Training.SparseRegrow(opt, every: 2, dropFraction: 0.3f);
        var start = twin.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        var acc = twin.Parameters.ToDictionary(p => p.Name, p => new float[p.Value.Length]);
        for (int step = 1; step <= 6; step++)
        {
            foreach (var (m, o) in new[] { (model, (PeftSharp.Training.Optimizer)opt), (twin, twinOpt) })
            {
                m.ZeroGrad();
                m.Loss(LoraTrainingTests.Tokens, LoraTrainingTests.Targets, 2, backward: true);
                o.Step(1e-2f);
            }

            regrow.AfterStep(step);
            foreach (var p in twin.Parameters)
            {
                var g = p.Grad.ToArray();
                var a = acc[p.Name];
                for (int i = 0; i < g.Length; i++) a[i] += Math.Abs(g[i]);
            }

            if (step % 2 != 0) continue;
            var current = twinOpt.Masks;
            foreach (var p in twin.Parameters)
            {
                var mask = current[p.Name];
                int drop = (int)Math.Round(0.3 * mask.Length);
                if (drop == 0) continue;
                var w = p.Value.ToArray();
                var w0 = start[p.Name];
                var a = acc[p.Name];
                var dropped = mask.OrderBy(i => Math.Abs(w[i] - w0[i])).ThenBy(i => i).Take(drop).ToHashSet();
                var inMask = mask.ToHashSet();
                var grown = Enumerable.Range(0, w.Length).Where(i => !inMask.Contains(i)).OrderByDescending(i => a[i]).ThenBy(i => i).Take(drop).ToArray();
                foreach (int i in dropped) w[i] = w0[i];
                p.Value.CopyFrom(w);
                twinOpt.Replace(p, mask.Where(i => !dropped.Contains(i)).Concat(grown).ToArray());
                Array.Clear(a);
            }
        }

        var got = opt.Masks;
        var expected = twinOpt.Masks;
        foreach (var p in twin.Parameters)
        {
            Assert.That(got[p.Name], Is.EqualTo(expected[p.Name]), $"{p.Name} mask");
            Assert.That(model[p.Name].Value.ToArray(), Is.EqualTo(p.Value.ToArray()), $"{p.Name} weights");
        }

        Assert.That(regrow.Regrown, Is.GreaterThan(0));
    }

    /// <summary>A sparse fine-tune with regrowth interrupted after its step-4 checkpoint and resumed ends bit-identical (weights, masks, swaps).</summary>
    [Test]
    public void Resume_SparseWithRegrow_EndsBitIdenticalToAnUninterruptedRun()
    {
        string dir = Directory.CreateTempSubdirectory("peftsharp-sparse-resume-").FullName;
        try
        {
            using var device = new CpuDevice();
            var options = new PeftSharp.Training.TrainOptions { Steps = 8, BatchSize = 4, SeqLen = 24, WarmupSteps = 2, CheckpointEvery = 4, Seed = 5 };
            (PeftSharp.Training.MaskedAdamW Opt, PeftSharp.Training.SparseRegrow Regrow, PeftSharp.Training.TrainingRun Run) Setup(LlamaModel model, IReadOnlyDictionary<string, int[]> masks)
            {
                var opt = new PeftSharp.Training.MaskedAdamW(model.AllParameters, masks);
                var regrow = new PeftSharp.Training.SparseRegrow(opt, every: 3, dropFraction: 0.25f);
                var run = new PeftSharp.Training.TrainingRun(model, opt, new PeftSharp.Training.LearningRateSchedule.Warmup(1e-2f, 2, 8),
                    PeftSharp.Training.ExampleSource.Tasks(PeftSharp.Data.TaskSuite.Tasks, 5, PeftSharp.Data.Split.Train), options);
                run.ExtraStates.Add(new PeftSharp.Training.SparseState(opt, regrow));
                return (opt, regrow, run);
            }

            var config = LlamaConfig.Tiny with { NumHiddenLayers = 1, HiddenSize = 32, IntermediateSize = 64, NumAttentionHeads = 2, NumKeyValueHeads = 1 };
            using var full = LlamaModel.Create(device, config, seed: 72);
            var masks = PeftSharp.Training.SparseMasks.Select(full, 0.1, PeftSharp.Training.MaskSource.Random, seed: 4);
            var (fullOpt, fullRegrow, fullRun) = Setup(full, masks);
            IReadOnlyDictionary<string, int[]> fullMasks;
            long fullRegrown;
            using (fullOpt)
            using (fullRegrow)
            {
                fullRun.Run(null, m => fullRegrow.AfterStep(m.Step));
                fullMasks = fullOpt.Masks;
                fullRegrown = fullRegrow.Regrown;
            }

            using (var first = LlamaModel.Create(device, config, seed: 72))
            {
                var (o, r, run) = Setup(first, masks);
                using (o)
                using (r)
                {
                    using var stop = new CancellationTokenSource();
                    // A cancelled run stops at a step boundary with a checkpoint and says so.
                    Assert.Throws<TrainingInterruptedException>(() => run.Run(dir, m =>
                        {
                            r.AfterStep(m.Step);
                            if (m.Step == 4) stop.Cancel();
                        }, stop.Token));
                }
            }

            string ckpt = Path.Combine(dir, "checkpoint");
            using var resumed = PeftSharp.Formats.HuggingFaceFolder.Load(ckpt, device);
            // Built with the run's first masks on purpose: the regrow at step 3 moved them, and Resume must restore the checkpoint's.
            Assert.That(PeftSharp.Training.SparseState.ReadMasks(ckpt).Any(kv => !kv.Value.SequenceEqual(masks[kv.Key])), "the checkpoint's masks differ from the first ones");
            var (opt2, regrow2, run2) = Setup(resumed, masks);
            using (opt2)
            using (regrow2)
            {
                run2.Resume(ckpt);
                run2.Run(dir, m => regrow2.AfterStep(m.Step));
                var masks2 = opt2.Masks;
                Assert.That(masks2.Keys, Is.EquivalentTo(fullMasks.Keys));
                foreach (var (name, mask) in fullMasks) Assert.That(masks2[name], Is.EqualTo(mask), $"{name} mask");
                Assert.That(regrow2.Regrown, Is.EqualTo(fullRegrown).And.GreaterThan(0));
            }

            foreach (var p in full.Parameters) Assert.That(resumed[p.Name].Value.ToArray(), Is.EqualTo(p.Value.ToArray()), p.Name);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
