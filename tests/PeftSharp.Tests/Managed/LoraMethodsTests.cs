using NUnit.Framework;
using PeftSharp.Adapters;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

/// <summary>DoRA, LoRA dropout, B-only, LoRA-GA and chain of LoRA.</summary>
public sealed class LoraMethodsTests : TempDirectoryTest
{
    private static readonly LlamaConfig Micro = LoraTrainingTests.Micro;
    private static readonly int[] Tokens = LoraTrainingTests.Tokens;
    private static readonly int[] Targets = LoraTrainingTests.Targets;

    /// <summary>Unit-scale base weights, so every path's gradient is well above the finite-difference noise.</summary>
    private static LlamaModel UnitModel(CpuDevice device) => LlamaModel.FromTensors(device, Micro, (name, shape) =>
    {
        int n = shape.Aggregate(1, (a, b) => a * b);
        var v = TestData.Uniform(n, name.Aggregate(17, (h, c) => unchecked(h * 31 + c)) & 0x7fff, -0.5f, 0.5f);
        return name.EndsWith("norm.weight", StringComparison.Ordinal) ? v.Select(x => 1f + x).ToArray() : v;
    });

    private static void RandomizeB(LlamaModel model)
    {
        foreach (var l in model.Lora.Values) l.B.Value.CopyFrom(TestData.Uniform(l.B.Value.Length, l.B.Value.Length + 3, -0.5f, 0.5f));
    }

    [Test]
    public void DoraGradients_MatchFiniteDifferences_WithTheNormHeldConstant()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        model.AddLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetModules = new[] { "q_proj", "v_proj", "up_proj", "down_proj" }, UseDora = true }, seed: 4);
        RandomizeB(model);
        foreach (var l in model.Lora.Values) l.Magnitude!.Value.CopyFrom(l.Magnitude.Value.ToArray().Select((v, i) => v * (1f + 0.1f * (i % 3))).ToArray());
        // PEFT treats ||W + s B A|| as a constant in the backward pass; finite differences of A and B would see it
        // move, so only m (which does not enter the norm) and the input path are checked by differences here, and A
        // and B through the equivalent model whose norm is frozen below.
        model["model.embed_tokens.weight"].Trainable = true;
        model.ZeroGrad();
        model.Loss(Tokens, Targets, 2, backward: true);
        var magnitudes = model.Lora.Values.Select(l => l.Magnitude!).Append(model["model.embed_tokens.weight"]).ToList();
        Assert.That(ModelGradients.Check(model, magnitudes, Tokens, Targets, batch: 2, samples: 3), Is.EqualTo(3 * magnitudes.Count));
    }

    /// <summary>
    /// Several adapters trained in one batch (adapter sets): sequence 0 belongs to adapter "a" (rank 2), sequences 1-3
    /// to "b" (rank 3). The joint loss is the token-weighted mean of each adapter's own loss, and each adapter's
    /// gradient is its single-adapter gradient on its own rows times its share of the counted tokens.
    /// </summary>
    [Test]
    public void LoraSets_OneBatch_EachAdapterGetsTheGradientOfItsOwnRows()
    {
        using var device = new CpuDevice();
        var configA = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear" };
        var configB = new LoraAdapterConfig { R = 3, LoraAlpha = 3, TargetModules = new[] { "q_proj", "v_proj", "down_proj" }, LoraBias = true }; // b's with lora_bias
        const int t = 5;
        var tokens = TestData.Ints(4 * t, 3, Micro.VocabSize);
        var targets = TestData.Ints(4 * t, 4, Micro.VocabSize);
        targets[7] = -100;
        using var joint = UnitModel(device);
        joint.AddLoraSet("a", configA, seed: 1);
        joint.AddLoraSet("b", configB, seed: 2);
        foreach (var l in joint.LoraSets.SelectMany(set => set.Layers.Values)) l.B.Value.CopyFrom(TestData.Uniform(l.B.Value.Length, l.B.Value.Length + 7, -0.5f, 0.5f));
        foreach (var l in joint.LoraSets[1].Layers.Values) l.BiasB!.Value.CopyFrom(TestData.Uniform(l.BiasB.Value.Length, 5, -0.5f, 0.5f));
        joint.ZeroGrad();
        var (jointLoss, jointCount) = joint.Loss(tokens, targets, 4, backward: true, new[] { 1, 3 });
        Assert.That(joint.Parameters.All(p => !p.Trainable), "the base is frozen");

        double weighted = 0;
        int total = 0;
        var singles = new List<(LlamaModel Model, int Count)>();
        try
        {
            foreach (var (set, first, count) in new[] { (joint.LoraSets[0], 0, 1), (joint.LoraSets[1], 1, 3) })
            {
                var alone = UnitModel(device);
                singles.Add((alone, 0));
                alone.AddLora(set.Config, seed: 9);
                foreach (var (module, l) in set.Layers)
                {
                    alone.Lora[module].A.Value.CopyFrom(l.A.Value.ToArray());
                    alone.Lora[module].B.Value.CopyFrom(l.B.Value.ToArray());
                    alone.Lora[module].BiasB?.Value.CopyFrom(l.BiasB!.Value.ToArray());
                }

                alone.ZeroGrad();
                var (loss, counted) = alone.Loss(tokens[(first * t)..((first + count) * t)], targets[(first * t)..((first + count) * t)], count, backward: true);
                singles[^1] = (alone, counted);
                weighted += loss * counted;
                total += counted;
            }

            Assert.That(jointCount, Is.EqualTo(total));
            Assert.That(jointLoss, Is.EqualTo(weighted / total).Within(1e-5 * Math.Abs(jointLoss)), "token-weighted mean of the adapters' losses");
            for (int k = 0; k < 2; k++)
            {
                var (alone, counted) = singles[k];
                double share = (double)counted / total;
                foreach (var (module, l) in joint.LoraSets[k].Layers)
                {
                    var pairs = new[] { (l.A, alone.Lora[module].A, "A"), (l.B, alone.Lora[module].B, "B") };
                    foreach (var (got, single, what) in l.BiasB == null ? pairs : pairs.Append((l.BiasB, alone.Lora[module].BiasB!, "lora_B.bias")))
                    {
                        var expected = single.Grad.ToArray().Select(g => (float)(g * share)).ToArray();
                        Check.Close(got.Grad.ToArray(), expected, (2e-6, 1e-4), $"set {joint.LoraSets[k].Name} {module} {what}");
                    }
                }
            }

            Assert.That(joint.LoraSets[1].Layers["model.layers.0.self_attn.q_proj"].A.Grad.ToArray().Any(g => g != 0f), "b's gradients are not empty");
            var exported = joint.ExportLoraSet("b");
            Assert.That(exported.Modules.Keys, Is.EquivalentTo(joint.LoraSets[1].Layers.Keys));
            Assert.That(exported.Biases.Keys, Is.EquivalentTo(joint.LoraSets[1].Layers.Keys), "lora_bias exports lora_B's biases");
            Assert.That(joint.LoraSets[1].Layers.Values.All(l => l.BiasB!.Grad.ToArray().Any(g => g != 0f)), "the biases get gradients");
        }
        finally
        {
            foreach (var (m, _) in singles) m.Dispose();
        }
    }

    /// <summary>
    /// DoRA with LoRA dropout, as PEFT trains it: y = W x + (c - 1) W xd + c s B A xd (xd the dropped-out input, c =
    /// m / ||W + s B A|| held constant). Gradients of m and of the input path against finite differences with the
    /// pass's dropout masks; with a vanishing drop probability the training loss is the plain DoRA loss; evaluation
    /// ignores dropout.
    /// </summary>
    [Test]
    public void DoraWithDropout_GradientsMatchFiniteDifferences_AndTheFormulaReducesToDora()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        var config = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetModules = new[] { "q_proj", "v_proj", "up_proj", "down_proj" }, UseDora = true, LoraDropout = 0.3f };
        model.AddLora(config, seed: 4);
        RandomizeB(model);
        foreach (var l in model.Lora.Values) l.Magnitude!.Value.CopyFrom(l.Magnitude.Value.ToArray().Select((v, i) => v * (1f + 0.1f * (i % 3))).ToArray());
        model["model.embed_tokens.weight"].Trainable = true;
        model.DropoutSeed = 11;
        model.ZeroGrad();
        double trainLoss = model.Loss(Tokens, Targets, 2, backward: true).Loss;
        double evalLoss = model.Loss(Tokens, Targets, 2, backward: false).Loss;
        Assert.That(trainLoss, Is.Not.EqualTo(evalLoss).Within(1e-4), "dropout changes the training pass");
        var checkedParams = model.Lora.Values.Select(l => l.Magnitude!).Append(model["model.embed_tokens.weight"]).ToList();
        Assert.That(ModelGradients.Check(model, checkedParams, Tokens, Targets, batch: 2, samples: 3, training: true), Is.EqualTo(3 * checkedParams.Count));

        // p -> 0: every mask entry is 1 / (1 - p) ~ 1, so W x - W xd vanishes and y -> c (W x + s B A x), plain DoRA.
        using var twin = UnitModel(device);
        twin.AddLora(config with { LoraDropout = 1e-7f }, seed: 4);
        foreach (var (module, l) in model.Lora)
        {
            twin.Lora[module].A.Value.CopyFrom(l.A.Value.ToArray());
            twin.Lora[module].B.Value.CopyFrom(l.B.Value.ToArray());
            twin.Lora[module].Magnitude!.Value.CopyFrom(l.Magnitude!.Value.ToArray());
        }

        twin.ZeroGrad();
        double nearZero = twin.Loss(Tokens, Targets, 2, backward: true).Loss;
        Assert.That(nearZero, Is.EqualTo(evalLoss).Within(1e-5 * Math.Abs(evalLoss)));
    }

    [Test]
    public void Dora_InitialMagnitudeIsTheRowNorm_SoTheModelIsUnchanged_MergeAndUnmergeRoundTrip_PeftFolderRoundTrips()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        var before = model.Logits(Tokens, 2);
        var config = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear", UseDora = true };
        model.AddLora(config, seed: 5);
        Check.Close(model.Logits(Tokens, 2), before, (1e-6, 1e-5), "DoRA with B = 0 and m = ||W||");
        RandomizeB(model);
        foreach (var l in model.Lora.Values) l.Magnitude!.Value.CopyFrom(l.Magnitude.Value.ToArray().Select((v, i) => v * (1f + 0.2f * (i % 2))).ToArray());
        var withDora = model.Logits(Tokens, 2);
        Assert.That(withDora, Is.Not.EqualTo(before).Within(1e-3));

        var adapter = model.ExportLora(config);
        string dir = Path.Combine(TempDir, "dora");
        adapter.Save(dir, Micro);
        Assert.That(File.ReadAllText(Path.Combine(dir, PeftLoraAdapter.ConfigFile)), Does.Contain("\"use_dora\": true"));
        var back = PeftLoraAdapter.Load(dir, Micro);
        foreach (var (m, v) in adapter.Magnitudes) Assert.That(back.Magnitudes[m], Is.EqualTo(v), m);
        using (var st = SafeTensorsFile.Open(Path.Combine(dir, PeftLoraAdapter.WeightsFile)))
        {
            Assert.That(st.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"));
        }

        using var merged = LlamaModel.FromTensors(device, Micro, (name, _) => model[name].Value.ToArray());
        var record = LoraMerge.Merge(merged, back);
        Check.Close(merged.Logits(Tokens, 2), withDora, (2e-5, 2e-4), "merged DoRA vs the DoRA branch");
        Assert.Throws<ArgumentException>(() => LoraMerge.Unmerge(merged, back));
        LoraMerge.Unmerge(merged, back, record);
        foreach (var p in model.Parameters) Check.Close(merged[p.Name].Value.ToArray(), p.Value.ToArray(), (1e-6, 1e-5), $"unmerged {p.Name}");
    }

    [Test]
    public void Dropout_ZeroesInputsWhileTraining_OnlyThen_SeededByTheStep_AndGradientsMatch()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        model.AddLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear", LoraDropout = 0.5f }, seed: 6);
        RandomizeB(model);
        var eval = model.Loss(Tokens, Targets, 2, backward: false).Loss;
        Assert.That(model.Loss(Tokens, Targets, 2, backward: false).Loss, Is.EqualTo(eval), "no dropout outside training");
        model.DropoutSeed = 1;
        var t1 = model.Loss(Tokens, Targets, 2, backward: true).Loss;
        model.DropoutSeed = 2;
        var t2 = model.Loss(Tokens, Targets, 2, backward: true).Loss;
        model.DropoutSeed = 1;
        Assert.That(model.Loss(Tokens, Targets, 2, backward: true).Loss, Is.EqualTo(t1), "the same seed draws the same masks");
        Assert.That(t1, Is.Not.EqualTo(t2).And.Not.EqualTo(eval));
        // With a fixed seed the masked function is deterministic: its gradients must match finite differences of
        // the training-mode loss, which ModelGradients evaluates through Loss(backward: true) with the same seed.
        model.DropoutSeed = 3;
        model.ZeroGrad();
        model.Loss(Tokens, Targets, 2, backward: true);
        var lora = model.Lora.Values.SelectMany(l => l.Parameters).ToList();
        Assert.That(ModelGradients.Check(model, lora, Tokens, Targets, batch: 2, samples: 2, training: true), Is.EqualTo(2 * lora.Count));
    }

    [Test]
    public void BOnly_LeavesAExactlyAtItsInit()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        model.AddLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear" }, seed: 7, trainA: false);
        var a0 = model.Lora.ToDictionary(l => l.Key, l => l.Value.A.Value.ToArray());
        using var opt = new AdamW(model.AllParameters, weightDecay: 0f);
        for (int i = 0; i < 5; i++)
        {
            model.ZeroGrad();
            model.Loss(Tokens, Targets, 2, backward: true);
            opt.Step(1e-2f);
        }

        foreach (var (m, l) in model.Lora)
        {
            Assert.That(l.A.Value.ToArray(), Is.EqualTo(a0[m]), m);
            Assert.That(l.B.Value.ToArray(), Is.Not.All.EqualTo(0f), m);
        }
    }

    [Test]
    public void LoraGa_KeepsTheModel_AlignsTheFirstStepWithTheFullGradient_AndExportsAgainstTheOriginalBase()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        var originalWeights = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        var before = model.Logits(Tokens, 2);
        const string m = "model.layers.1.mlp.up_proj";
        // The full gradient of the weight, for the alignment check.
        foreach (var p in model.Parameters) p.Trainable = p.Name == m + ".weight";
        model.ZeroGrad();
        model.Loss(Tokens, Targets, 2, backward: true);
        var g = model[m + ".weight"].Grad.ToArray();
        foreach (var p in model.Parameters) p.Trainable = true;

        double Alignment(bool ga)
        {
            using var copy = LlamaModel.FromTensors(device, Micro, (name, _) => originalWeights[name]);
            var config = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetModules = new[] { "up_proj" } };
            if (ga) LoraGa.AddLora(copy, config, new[] { (Tokens, Targets) }, 2, seed: 8);
            else copy.AddLora(config, seed: 8);
            if (ga) Check.Close(copy.Logits(Tokens, 2), before, (2e-5, 2e-4), "LoRA-GA absorbs s B0 A0: the model is unchanged");
            var l = copy.Lora[m];
            var w0 = Product(l);
            copy.ZeroGrad();
            copy.Loss(Tokens, Targets, 2, backward: true);
            using var sgd = new Sgd(copy.AllParameters);
            sgd.Step(1e-3f);
            var w1 = Product(l);
            var delta = w1.Zip(w0, (x, y) => (double)x - y).ToArray();
            double dot = delta.Zip(g, (d, gg) => -d * gg).Sum(), nd = Math.Sqrt(delta.Sum(d => d * d)), ng = Math.Sqrt(g.Sum(x => (double)x * x));
            return dot / (nd * ng);
        }

        double plain = Alignment(false), ga = Alignment(true);
        TestContext.Out.WriteLine($"cosine(first step of s B A, -G): default init {plain:F3}, LoRA-GA {ga:F3}");
        Assert.That(ga, Is.GreaterThan(0.5).And.GreaterThan(plain + 0.2));

        // Trained a little, exported (rank 2r against the original base), loaded onto the original weights: same logits.
        using var trained = LlamaModel.FromTensors(device, Micro, (name, _) => originalWeights[name]);
        var cfg = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear" };
        LoraGa.AddLora(trained, cfg, new[] { (Tokens, Targets) }, 2, seed: 9);
        using (var opt = new AdamW(trained.AllParameters, weightDecay: 0f))
        {
            trained.ZeroGrad();
            trained.Loss(Tokens, Targets, 2, backward: true);
            opt.Step(1e-2f);
        }

        var exported = trained.ExportLora(cfg);
        Assert.That(exported.Config.R, Is.EqualTo(4));
        Assert.That(exported.Config.Scale(m), Is.EqualTo(cfg.Scale(m)));
        using var onOriginal = LlamaModel.FromTensors(device, Micro, (name, _) => originalWeights[name]);
        LoraMerge.Merge(onOriginal, exported);
        Check.Close(onOriginal.Logits(Tokens, 2), trained.Logits(Tokens, 2), (2e-5, 2e-4), "exported adapter on the original base");
    }

    private static float[] Product(LoraLayer l)
    {
        var a = l.A.Value.ToArray();
        var b = l.B.Value.ToArray();
        int r = l.Rank, inF = a.Length / r, outF = b.Length / r;
        var w = new float[outF * inF];
        for (int o = 0; o < outF; o++)
        {
            for (int i = 0; i < inF; i++)
            {
                double acc = 0;
                for (int q = 0; q < r; q++) acc += (double)b[o * r + q] * a[q * inF + i];
                w[o * inF + i] = (float)(l.Scale * acc);
            }
        }

        return w;
    }

    [Test]
    public void ChainOfLora_MergeAndRestartKeepsTheFunction_AndTrainingContinues()
    {
        using var device = new CpuDevice();
        using var model = UnitModel(device);
        model.AddLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear", UseDora = false }, seed: 10);
        RandomizeB(model);
        var before = model.Logits(Tokens, 2);
        var w = model["model.layers.0.self_attn.q_proj.weight"].Value.ToArray();
        model.MergeLoraAndRestart(seed: 11);
        Check.Close(model.Logits(Tokens, 2), before, (2e-5, 2e-4), "merge then restart: same function");
        Assert.That(model["model.layers.0.self_attn.q_proj.weight"].Value.ToArray(), Is.Not.EqualTo(w), "the base absorbed the link");
        Assert.That(model.Lora.Values.All(l => l.B.Value.ToArray().All(v => v == 0f)), "fresh links start at B = 0");
        Assert.Throws<InvalidOperationException>(() => model.ExportLora(new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetRegex = "all-linear" }));
    }
}
