using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.Core;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

public sealed class LlamaModelTests
{
    /// <summary>Tiny but complete: GQA (H=2, Hkv=1), two layers, odd vocabulary and intermediate sizes.</summary>
    private static LlamaConfig Micro(bool tied) => new()
    {
        HiddenSize = 8, IntermediateSize = 11, NumAttentionHeads = 2, NumKeyValueHeads = 1, NumHiddenLayers = 2,
        VocabSize = 13, RmsNormEps = 1e-5f, RopeTheta = 10000f, MaxPositionEmbeddings = 16, TieWordEmbeddings = tied,
    };

    /// <summary>Weights uniform in [-0.5, 0.5] (norm weights around 1) so gradients are large enough to check.</summary>
    private static Func<string, int[], float[]> Weights(int seed) => (name, shape) =>
    {
        int n = shape.Aggregate(1, (a, b) => a * b);
        // A stable per-name seed (string.GetHashCode is randomized per process, which made these weights differ run to run).
        int nameSeed = name.Aggregate(17, (h, c) => unchecked(h * 31 + c)) & 0x7fff;
        var v = TestData.Uniform(n, seed + nameSeed, -0.5f, 0.5f);
        if (name.EndsWith("norm.weight", StringComparison.Ordinal)) v = v.Select(x => 1f + x).ToArray();
        return v;
    };

    private static readonly int[] Tokens = { 1, 5, 12, 0, 7, 7 };   // B = 2, T = 3
    private static readonly int[] Targets = { 5, 12, 3, 7, -100, 9 };

    [TestCase(false, TestName = "Model_GradientCheck_Untied")]
    [TestCase(true, TestName = "Model_GradientCheck_TiedEmbeddings")]
    public void Model_BackwardMatchesFiniteDifferences(bool tied)
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.FromTensors(device, Micro(tied), Weights(3));
        model.ZeroGrad();
        model.Loss(Tokens, Targets, batch: 2, backward: true);
        int checkedCount = ModelGradients.Check(model, model.Parameters, Tokens, Targets, batch: 2, samples: 4);
        Assert.That(checkedCount, Is.EqualTo(4 * model.Parameters.Count));
    }

    /// <summary>
    /// The model's logits for <see cref="Tokens"/>, checked against the plain reference forward of its config, and
    /// shown to differ from the same weights under <paramref name="without"/> (the option off), so the check can fail.
    /// </summary>
    private static float[] LogitsMatchReference(LlamaModel model, Func<string, int[], float[]> weights, LlamaConfig without, string what)
    {
        var config = model.Config;
        var logits = model.Logits(Tokens, batch: 2);
        Check.Close(logits, ReferenceForward(config, name => weights(name, LlamaModel.ParameterShapes(config).First(s => s.Name == name).Shape), Tokens, 2), (2e-5, 2e-4), what);
        using var plain = LlamaModel.FromTensors(model.Device, without, weights);
        Assert.That(plain.Logits(Tokens, batch: 2), Is.Not.EqualTo(logits).Within(1e-4), $"{what}: the option changes the logits, so the check above can fail");
        return logits;
    }

    /// <summary>Prefill of the first sequence's first two tokens, then one decode step, against the full pass's logits.</summary>
    private static void DecodeMatchesForward(LlamaModel model, float[] logits)
    {
        int v = model.Config.VocabSize;
        using var cache = new KvCache(model, 8);
        Check.Close(model.DecodeStep(cache, Tokens[..2]), logits.AsSpan(1 * v, v), (2e-5, 2e-4), "prefill");
        Check.Close(model.DecodeStep(cache, Tokens[2..3]), logits.AsSpan(2 * v, v), (2e-5, 2e-4), "decode");
    }

    /// <summary>
    /// Qwen3 is the Llama graph plus a per-head RMSNorm of q and k before RoPE (self_attn.q_norm / k_norm): the forward
    /// against the plain reference with that step, its gradients (norm weights included) against finite differences,
    /// decode against the full pass, and config.json read and written as Qwen3ForCausalLM.
    /// </summary>
    [Test]
    public void Qwen3QkNorm_ForwardBackwardDecodeAndConfig()
    {
        using var device = new CpuDevice();
        var config = Micro(tied: true) with { QkNorm = true };
        var weights = Weights(11);
        using var model = LlamaModel.FromTensors(device, config, weights);
        Assert.That(model.Has("model.layers.1.self_attn.k_norm.weight") && model["model.layers.0.self_attn.q_norm.weight"].Value.Shape.SequenceEqual(new[] { config.HeadDim }));
        var logits = LogitsMatchReference(model, weights, config with { QkNorm = false }, "q/k-normed logits");

        model.ZeroGrad();
        model.Loss(Tokens, Targets, batch: 2, backward: true);
        Assert.That(ModelGradients.Check(model, model.Parameters, Tokens, Targets, batch: 2, samples: 3), Is.EqualTo(3 * model.Parameters.Count));

        DecodeMatchesForward(model, logits);

        const string json = """
            {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 172, "head_dim": 32,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 259, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": true, "attention_bias": false,
             "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28, "hidden_act": "silu"}
            """;
        var qwen3 = LlamaConfig.Parse(json);
        Assert.That((qwen3.QkNorm, qwen3.HeadDim, qwen3.RopeTheta), Is.EqualTo((true, 32, 1000000f)));
        Assert.That(LlamaConfig.Parse(qwen3.ToJson()), Is.EqualTo(qwen3));
        Assert.That(qwen3.ToJson(), Does.Contain("Qwen3ForCausalLM"));
        Assert.That(LlamaConfig.Parse(json.Replace("\"Qwen3ForCausalLM\"", "\"LlamaForCausalLM\"").Replace("\"qwen3\"", "\"llama\"")).QkNorm, Is.False);
        var sliding = Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"use_sliding_window\": false", "\"use_sliding_window\": true")))!;
        Assert.That(sliding.Message, Does.Contain("use_sliding_window"));
        Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"qwen3\"", "\"llama\"")), "Qwen3 weights under a llama model_type");
    }

    /// <summary>
    /// Qwen2 is the Llama graph plus biases on q, k and v: the forward against the plain reference with them, their
    /// gradients against finite differences, decode against the full pass, LoRA on a biased projection (B = 0 leaves
    /// the biased output; the bias is outside the adapter), and config.json read and written as Qwen2ForCausalLM.
    /// </summary>
    [Test]
    public void Qwen2QkvBias_ForwardBackwardDecodeLoraAndConfig()
    {
        using var device = new CpuDevice();
        var config = Micro(tied: true) with { QkvBias = true };
        var weights = Weights(13);
        using var model = LlamaModel.FromTensors(device, config, weights);
        Assert.That(model["model.layers.1.self_attn.k_proj.bias"].Value.Shape.ToArray(), Is.EqualTo(new[] { config.NumKeyValueHeads * config.HeadDim }));
        Assert.That(model.Has("model.layers.0.self_attn.o_proj.bias"), Is.False, "o_proj has no bias in Qwen2");
        var logits = LogitsMatchReference(model, weights, config with { QkvBias = false }, "biased logits");

        model.ZeroGrad();
        model.Loss(Tokens, Targets, batch: 2, backward: true);
        var biases = model.Parameters.Where(p => p.Name.EndsWith(".bias", StringComparison.Ordinal)).ToList();
        Assert.That(biases, Has.Count.EqualTo(6));
        Assert.That(ModelGradients.Check(model, biases, Tokens, Targets, batch: 2, samples: 4), Is.EqualTo(4 * biases.Count), "bias gradients");
        Assert.That(ModelGradients.Check(model, model.Parameters, Tokens, Targets, batch: 2, samples: 2), Is.EqualTo(2 * model.Parameters.Count));

        DecodeMatchesForward(model, logits);

        model.AddLora(new PeftSharp.Formats.LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetModules = new[] { "q_proj", "v_proj" } }, seed: 3);
        Assert.That(model.Logits(Tokens, batch: 2), Is.EqualTo(logits), "B = 0: the adapter adds nothing and the bias stays once");
        Assert.That(model.Parameters.Where(p => p.Name.EndsWith(".bias", StringComparison.Ordinal)).All(p => !p.Trainable), Is.True, "LoRA freezes the biases with the base");
        model.RemoveLora();

        // A full fine-tune that moved the biases, as a 1-bit delta (biases travel dense) served beside base rows:
        // each row equals its own model (the delta merged into a copy).
        using (var fine = LlamaModel.FromTensors(device, config, (name, shape) =>
        {
            var v = model[name].Value.ToArray();
            var noise = TestData.Uniform(v.Length, name.Length, -0.05f, 0.05f);
            return name.Contains("_proj.") ? v.Select((x, i) => x + noise[i]).ToArray() : v;
        }))
        using (var set = new PeftSharp.Serving.VariantSet(model))
        {
            var delta = PeftSharp.Compression.BitDelta.Compress(model, fine);
            Assert.That(delta.Dense.Keys.Where(k => k.EndsWith(".bias", StringComparison.Ordinal)).Count(), Is.EqualTo(6), "the moved biases travel in the delta");
            set.AddDelta("fine", delta);
            using var merged = LlamaModel.FromTensors(device, config, (name, _) => model[name].Value.ToArray());
            delta.MergeInto(merged);
            int[][] prompts = { new[] { 3, 1, 4 }, new[] { 5, 9 } };
            var caches = prompts.Select(_ => new KvCache(model, 4)).ToArray();
            try
            {
                using var bound = set.Bind(new[] { -1, -1, -1, 0, 0 });
                var rows = model.DecodeBatch(caches, prompts, bound);
                using (var c0 = new KvCache(model, 4)) Check.Close(rows[0], model.DecodeStep(c0, prompts[0]), (2e-5, 2e-4), "base row");
                using (var c1 = new KvCache(merged, 4)) Check.Close(rows[1], merged.DecodeStep(c1, prompts[1]), (2e-5, 2e-4), "1-bit row with its own biases");
            }
            finally
            {
                foreach (var c in caches) c.Dispose();
            }
        }

        const string json = """
            {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 172,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 259, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": true, "use_sliding_window": false,
             "sliding_window": 32768, "max_window_layers": 21, "hidden_act": "silu", "torch_dtype": "bfloat16"}
            """;
        var qwen2 = LlamaConfig.Parse(json);
        Assert.That((qwen2.QkvBias, qwen2.QkNorm, qwen2.SlidingWindow, qwen2.ContextLimit), Is.EqualTo((true, false, (int?)null, 512)), "sliding_window is unused without use_sliding_window");
        Assert.That(LlamaConfig.Parse(qwen2.ToJson()), Is.EqualTo(qwen2));
        Assert.That(qwen2.ToJson(), Does.Contain("Qwen2ForCausalLM"));
        Assert.That(Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"use_sliding_window\": false", "\"use_sliding_window\": true")))!.Message,
            Does.Contain("use_sliding_window"));
        Assert.That(Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"qwen2\"", "\"llama\"")))!.Message, Does.Contain("mix Qwen2"));
    }

    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void Model_Forward_MatchesReferenceForwardOnEveryBackend(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = Micro(tied: false);
        var weights = Weights(5);
        using var model = LlamaModel.FromTensors(device, config, weights);
        var logits = model.Logits(Tokens, batch: 2);
        var expected = ReferenceForward(config, name => weights(name, LlamaModel.ParameterShapes(config).First(s => s.Name == name).Shape), Tokens, 2);
        Check.Close(logits, expected, (2e-5, 2e-4), $"{backend} logits");

        // Llama 3.1's rope_scaling, with an original context of 4 so the short test sequences cross all three bands.
        var scaled = config with { RopeScaling = new PeftSharp.Kernels.Core.RopeScaling { Type = PeftSharp.Kernels.Core.RopeScaling.Llama3, Factor = 8f, LowFreqFactor = 1f,
            HighFreqFactor = 4f, OriginalMaxPositions = 4f } };
        using var scaledModel = LlamaModel.FromTensors(device, scaled, weights);
        var scaledLogits = scaledModel.Logits(Tokens, batch: 2);
        Check.Close(scaledLogits, ReferenceForward(scaled, name => weights(name, LlamaModel.ParameterShapes(scaled).First(s => s.Name == name).Shape), Tokens, 2), (2e-5, 2e-4),
            $"{backend} llama3-scaled logits");
        Assert.That(scaledLogits, Is.Not.EqualTo(logits).Within(1e-4), "the scaling changes the logits, so the check above can fail");
    }

    /// <summary>
    /// The forward pass allocates its activations with <see cref="Device.Empty"/>: on the CPU backend a reused array
    /// keeps the previous pass's values, so an op that read its output before writing it would make a pass depend on
    /// the one before. Activations here are at least the pool's 4096 floats (128 tokens x 32 hidden, x 48 intermediate,
    /// x 40 vocabulary), so passes two and three run on the arrays the pass before left behind.
    /// </summary>
    [Test]
    public void Model_Forward_OnReusedUnzeroedArrays_DependsOnlyOnItsInput()
    {
        using var device = new CpuDevice();
        var config = new LlamaConfig
        {
            HiddenSize = 32, IntermediateSize = 48, NumAttentionHeads = 4, NumKeyValueHeads = 2, NumHiddenLayers = 2,
            VocabSize = 40, RmsNormEps = 1e-5f, RopeTheta = 10000f, MaxPositionEmbeddings = 64,
        };
        using var model = LlamaModel.FromTensors(device, config, Weights(7));
        var a = TestData.Ints(128, 1, 40);
        var b = TestData.Ints(128, 2, 40);
        var first = model.Logits(a, batch: 2);
        Assert.That(device.CachedBytes, Is.GreaterThan(0), "the pass returned its arrays to the pool");
        var other = model.Logits(b, batch: 2);
        var again = model.Logits(a, batch: 2);
        Assert.That(other, Is.Not.EqualTo(first), "different inputs leave different values behind");
        Assert.That(again, Is.EqualTo(first), "same input, same logits, bit for bit");
    }

    [Test]
    public void Model_SameSeed_SameWeights_AndParameterNamesAreHuggingFaces()
    {
        using var device = new CpuDevice();
        using var a = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 7);
        using var b = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 7);
        Assert.That(a["model.layers.1.mlp.down_proj.weight"].Value.ToArray(), Is.EqualTo(b["model.layers.1.mlp.down_proj.weight"].Value.ToArray()));
        Assert.That(a.Parameters.Select(p => p.Name), Does.Contain("model.layers.0.self_attn.q_proj.weight").And.Contain("model.norm.weight"));
        Assert.That(a.Has("lm_head.weight"), Is.False, "tied config has no lm_head");
        Assert.That(a["model.layers.0.self_attn.k_proj.weight"].Value.Shape, Is.EqualTo(new[] { 2 * 16, 64 }));
    }

    /// <summary>
    /// transformers 5 writes rope settings into rope_parameters and drops the top-level rope_theta / rope_scaling
    /// (Llama 3.1 as 5.x saves it, below). Read as the 4.x layout reads, so the model is the same; both layouts present
    /// and disagreeing, or rope parameters per attention type, are refused naming the keys.
    /// </summary>
    [Test]
    public void Config_Transformers5RopeParameters_ReadAsTheTransformers4Layout()
    {
        const string common = """
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 259, "rms_norm_eps": 1e-05,
            "max_position_embeddings": 512, "tie_word_embeddings": true
            """;
        const string scaling = """
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"
            """;
        var v4 = LlamaConfig.Parse($$"""{ {{common}}, "rope_theta": 500000.0, "rope_scaling": { {{scaling}} } }""");
        var v5 = LlamaConfig.Parse($$"""{ {{common}}, "rope_parameters": { "rope_theta": 500000.0, {{scaling}} } }""");
        Assert.That(v5, Is.EqualTo(v4));
        Assert.That((v5.RopeTheta, v5.RopeScaling.Type), Is.EqualTo((500000f, PeftSharp.Kernels.Core.RopeScaling.Llama3)), "theta and llama3 scaling come from rope_parameters");
        var plain = LlamaConfig.Parse($$"""{ {{common}}, "rope_parameters": { "rope_type": "default", "rope_theta": 1000000.0 } }""");
        Assert.That((plain.RopeTheta, plain.RopeScaling.Type), Is.EqualTo((1000000f, PeftSharp.Kernels.Core.RopeScaling.None)));
        Assert.That(LlamaConfig.Parse($$"""{ {{common}}, "rope_theta": 500000.0, "rope_parameters": { "rope_theta": 500000.0, {{scaling}} }, "rope_scaling": { {{scaling}} } }"""),
            Is.EqualTo(v4), "both layouts, agreeing");

        var theta = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse($$"""{ {{common}}, "rope_theta": 10000.0, "rope_parameters": { "rope_theta": 500000.0 } }"""))!;
        Assert.That(theta.Message, Does.Contain("rope_theta").And.Contain("rope_parameters.rope_theta"));
        var scaled = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(
            $$"""{ {{common}}, "rope_parameters": { "rope_theta": 500000.0, {{scaling}} }, "rope_scaling": { "rope_type": "linear", "factor": 2.0 } }"""))!;
        Assert.That(scaled.Message, Does.Contain("rope_scaling").And.Contain("rope_parameters"));
        var perType = Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(
            $$"""{ {{common}}, "rope_parameters": { "full_attention": { "rope_theta": 1000000.0 }, "sliding_attention": { "rope_theta": 10000.0 } } }"""))!;
        Assert.That(perType.Message, Does.Contain("rope_parameters").And.Contain("sliding_attention"));
        var yarn = Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse($$"""{ {{common}}, "rope_parameters": { "rope_type": "yarn", "factor": 4.0 } }"""))!;
        Assert.That(yarn.Message, Does.Contain("rope_parameters type 'yarn'"));
    }

    /// <summary>
    /// MistralForCausalLM is Llama's graph with a sliding window: read and written under Mistral's names; with sequences
    /// longer than the window (T = 3, W = 2) its logits equal the reference forward that masks keys j &lt;= p - W as
    /// transformers does (and differ from the same weights without the window), its gradients match finite
    /// differences, and decode over the KV cache past the window equals the full pass; within the window it is Llama.
    /// </summary>
    [Test]
    public void Mistral_SlidingWindow_ForwardBackwardDecodeAndConfig()
    {
        const string json = """
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 8, "intermediate_size": 11, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 13, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
             "max_position_embeddings": 32, "sliding_window": 2, "tie_word_embeddings": false, "hidden_act": "silu"}
            """;
        var mistral = LlamaConfig.Parse(json, "mistral.json");
        Assert.That((mistral.Mistral, mistral.SlidingWindow, mistral.ContextLimit), Is.EqualTo((true, (int?)2, 32)));
        Assert.That(LlamaConfig.Parse(mistral.ToJson()), Is.EqualTo(mistral), "written back as MistralForCausalLM with its window");
        Assert.That(mistral.ToJson(), Does.Contain("MistralForCausalLM").And.Contain("\"sliding_window\": 2"));
        var v3 = LlamaConfig.Parse(json.Replace("\"sliding_window\": 2", "\"sliding_window\": null"));
        Assert.That((v3.SlidingWindow, v3.ContextLimit), Is.EqualTo(((int?)null, 32)), "Mistral v0.2+ has no window");

        using var device = new CpuDevice();
        var weights = Weights(4);
        using var model = LlamaModel.FromTensors(device, mistral, weights);
        var logits = LogitsMatchReference(model, weights, mistral with { SlidingWindow = null }, "windowed logits");
        model.ZeroGrad();
        model.Loss(Tokens, Targets, batch: 2, backward: true);
        Assert.That(ModelGradients.Check(model, model.Parameters, Tokens, Targets, batch: 2, samples: 3), Is.EqualTo(3 * model.Parameters.Count));
        DecodeMatchesForward(model, logits);

        var wide = mistral with { SlidingWindow = 3 };
        using var within = LlamaModel.FromTensors(device, wide, weights);
        using var asLlama = LlamaModel.FromTensors(device, wide with { Mistral = false, SlidingWindow = null }, weights);
        Assert.That(within.Logits(Tokens, batch: 2), Is.EqualTo(asLlama.Logits(Tokens, batch: 2)), "within the window: the Llama graph, bit for bit");
        Assert.That(Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"mistral\"", "\"llama\"")))!.Message, Does.Contain("mix Mistral"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(json.Replace("\"sliding_window\": 2", "\"sliding_window\": 0")))!.Message,
            Does.Contain("sliding_window = 0"));
    }

    /// <summary>
    /// Generation under a sliding window: requests that share a prompt prefix but run past the window share nothing
    /// (the prefix would leave their window) and each equals the request alone; prefix tuning past the window is refused.
    /// </summary>
    [Test]
    public void Mistral_GenerationPastTheWindow_EqualsEachRequestAlone()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny with { Mistral = true, SlidingWindow = 6 }, seed: 8);
        var requests = new[] { "a shared prompt, one", "a shared prompt, two", "ab" }.Select(p => new PeftSharp.Serving.GenerationRequest(p, MaxTokens: 5)).ToList();
        var batched = PeftSharp.Serving.BatchGenerator.Generate(model, requests);
        for (int i = 0; i < requests.Count; i++)
        {
            Assert.That(batched[i].Completion, Is.EqualTo(PeftSharp.Serving.Generator.Sample(model, requests[i].Prompt, 5, 0f, 0, 1f, 0)), requests[i].Prompt);
        }

        using var prefixed = LlamaModel.Create(device, LlamaConfig.Tiny with { Mistral = true, SlidingWindow = 6 }, seed: 8);
        prefixed.AddPrefixTuning(tokens: 2, seed: 1);
        var e = Assert.Throws<NotSupportedException>(() => prefixed.Logits(new[] { 1, 2, 3, 4, 5 }, batch: 1))!;
        Assert.That(e.Message, Does.Contain("sliding_window = 6").And.Contain("virtual tokens"));
        Assert.That(prefixed.Logits(new[] { 1, 2, 3 }, batch: 1), Has.Length.EqualTo(3 * 259), "within the window: exact, and allowed");
    }

    /// <summary>Values that would give NaNs or a division by zero are refused when the config is read, naming the key.</summary>
    [Test]
    public void Config_OutOfRangeValues_RefusedAtParseTime()
    {
        const string json = """
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 259,
             "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": true}
            """;
        Assert.That(LlamaConfig.Parse(json), Is.EqualTo(LlamaConfig.Tiny));
        foreach (var (from, to, expected) in new[]
        {
            ("\"rope_theta\": 10000.0", "\"rope_theta\": 1.0", "rope_theta = 1"),
            ("\"rope_theta\": 10000.0", "\"rope_theta\": -5.0", "rope_theta = -5"),
            ("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": -1e-05", "rms_norm_eps"),
            ("\"max_position_embeddings\": 512", "\"max_position_embeddings\": 0", "max_position_embeddings = 0"),
            ("\"vocab_size\": 259", "\"vocab_size\": 259, \"head_dim\": -16", "head_dim = -16"),
            ("\"vocab_size\": 259", "\"vocab_size\": 259, \"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 0.0}", "factor = 0"),
            ("\"vocab_size\": 259", "\"vocab_size\": 259, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 4.0, " +
                "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}", "high_freq_factor > low_freq_factor"),
        })
        {
            Assert.That(json, Does.Contain(from));
            var e = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(json.Replace(from, to), "cfg.json"))!;
            Assert.That(e.Message, Does.Contain(expected).And.Contain("cfg.json"), to);
        }
    }

    /// <summary>
    /// A config is sized before anything is allocated: a tensor over int.MaxValue elements is refused at parse time,
    /// weights or a KV cache larger than the device's whole memory are refused with the figure they need.
    /// </summary>
    [Test]
    public void Config_TooLargeForDevice_RefusedBeforeAllocation()
    {
        var huge = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(LlamaConfig.Tiny.ToJson().Replace("\"vocab_size\": 259", "\"vocab_size\": 40000000"), "big.json"))!;
        Assert.That(huge.Message, Does.Contain("big.json").And.Contain("model.embed_tokens.weight [40000000, 64]").And.Contain("more than one tensor holds"));

        using var device = new CpuDevice();
        long memory = device.Info.MemoryBytes;
        // Each layer's MLP is 3 x 16384 x 32768 fp32 (6 GiB): enough layers to pass any CPU's memory by a margin.
        int layers = (int)Math.Min(4000, memory / (6L << 30) + 2);
        var wide = LlamaConfig.Tiny with { HiddenSize = 16384, IntermediateSize = 32768, NumAttentionHeads = 128, NumKeyValueHeads = 8, NumHiddenLayers = layers, VocabSize = 32 };
        Assert.That(ModelMemory.WeightBytes(wide), Is.GreaterThan(memory));
        long before = GC.GetTotalAllocatedBytes();
        var e = Assert.Throws<PeftSharpInputException>(() => LlamaModel.Create(device, wide, seed: 1))!;
        Assert.That(e.Message, Does.Contain($"{layers} layers").And.Contain("as fp32 need").And.Contain(ModelMemory.Describe(ModelMemory.WeightBytes(wide))).And.Contain("cpu has"));
        Assert.That(GC.GetTotalAllocatedBytes() - before, Is.LessThan(64L << 20), "refused before allocating weights");

        // A KV cache as long as max_position_embeddings allows but beyond memory: refused with its size.
        var longContext = Micro(tied: true) with { MaxPositionEmbeddings = int.MaxValue };
        using var model = LlamaModel.FromTensors(device, longContext, Weights(1));
        long perPosition = ModelMemory.KvCacheBytes(longContext, 1);
        int positions = (int)Math.Min(int.MaxValue, memory / perPosition + 1);
        var kv = Assert.Throws<PeftSharpInputException>(() => new KvCache(model, positions))!;
        Assert.That(kv.Message, Does.Contain($"a KV cache of {positions} positions need"));
        using var fits = new KvCache(model, 64);
        Assert.That(ModelMemory.KvCacheBytes(longContext, 64), Is.EqualTo(2L * 2 * 64 * 1 * 4 * sizeof(float)));
    }

    /// <summary>Frozen parameters hold no gradient: only what a backward pass touches allocates one.</summary>
    [Test]
    public void Parameters_AllocateGradients_OnlyWhenUsed()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.FromTensors(device, Micro(tied: false), Weights(2));
        model.Logits(Tokens, batch: 2);
        Assert.That(model.AllParameters.Where(p => p.HasGrad), Is.Empty, "inference allocates no gradients");
        foreach (var p in model.AllParameters) p.Trainable = p.Name == "lm_head.weight";
        model.ZeroGrad();
        model.Loss(Tokens, Targets, batch: 2, backward: true);
        Assert.That(model.AllParameters.Where(p => p.HasGrad).Select(p => p.Name), Is.EqualTo(new[] { "lm_head.weight" }));
        Assert.That(model["lm_head.weight"].Grad.ToArray().Any(g => g != 0f), Is.True);
        model["lm_head.weight"].ReleaseGrad();
        Assert.That(model["lm_head.weight"].Grad.ToArray().All(g => g == 0f), Is.True, "a released gradient comes back as zeros");
    }

    [Test]
    public void Config_ParsesHuggingFaceJson_AndRejectsOtherArchitectures()
    {
        const string json = """
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 259,
             "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": true,
             "torch_dtype": "bfloat16", "bos_token_id": 1}
            """;
        var c = LlamaConfig.Parse(json);
        Assert.That(c, Is.EqualTo(LlamaConfig.Tiny));
        Assert.That(LlamaConfig.Parse(c.ToJson()), Is.EqualTo(c));
        var e = Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse("""{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"""))!;
        Assert.That(e.Message, Does.Contain("GPT2LMHeadModel").And.Contain("gpt2"));
        var bad = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(json.Replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3")))!;
        Assert.That(bad.Message, Does.Contain("num_key_value_heads = 3"));

        // Llama 3.1's rope_scaling is read and written back; a field it needs missing is named.
        var llama31 = LlamaConfig.Parse(json.Replace("\"bos_token_id\": 1",
            "\"rope_scaling\": {\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192, \"rope_type\": \"llama3\"}"));
        Assert.That((llama31.RopeScaling.Type, llama31.RopeScaling.Factor, llama31.RopeScaling.OriginalMaxPositions), Is.EqualTo((PeftSharp.Kernels.Core.RopeScaling.Llama3, 8f, 8192f)));
        Assert.That(LlamaConfig.Parse(llama31.ToJson()), Is.EqualTo(llama31));
        Assert.That(LlamaConfig.Differences(llama31, c), Has.Count.EqualTo(1).And.Some.Contains("rope_scaling"));
        Assert.That(Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(json.Replace("\"bos_token_id\": 1", "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}")))!.Message,
            Does.Contain("low_freq_factor"));

        // Settings that would change the graph are refused by name, never ignored.
        Assert.That(LlamaConfig.Parse(json.Replace("\"bos_token_id\": 1", "\"hidden_act\": \"silu\", \"attention_bias\": false")), Is.EqualTo(c));
        foreach (var (setting, name) in new[]
        {
            ("\"hidden_act\": \"gelu\"", "hidden_act 'gelu'"), ("\"attention_bias\": true", "attention_bias"), ("\"mlp_bias\": true", "mlp_bias"),
            ("\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 8.0}", "rope_scaling type 'yarn'"),
            ("\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}", "rope_scaling type 'dynamic'"),
        })
        {
            var refused = Assert.Throws<NotSupportedException>(() => LlamaConfig.Parse(json.Replace("\"bos_token_id\": 1", setting)))!;
            Assert.That(refused.Message, Does.Contain(name));
        }
    }

    /// <summary>The model's forward written with the plain references only (double accumulation inside each op).</summary>
    private static float[] ReferenceForward(LlamaConfig c, Func<string, float[]> w, int[] tokens, int batch)
    {
        int n = tokens.Length, t = n / batch, dm = c.HiddenSize, d = c.HeadDim, h = c.NumAttentionHeads, hkv = c.NumKeyValueHeads, inter = c.IntermediateSize;
        var pos = Enumerable.Range(0, n).Select(i => i % t).ToArray();
        float[] Linear(float[] x, string name, int outDim, int inDim)
        {
            var y = new float[x.Length / inDim * outDim];
            MatMulReference.Forward(x, w(name), y, new MatMulShape(1, x.Length / inDim, outDim, inDim, false, true, true));
            return y;
        }

        float[] Norm(float[] x, string name)
        {
            var y = new float[x.Length];
            RmsNormReference.Forward(x, w(name), y, new float[n], n, dm, c.RmsNormEps);
            return y;
        }

        var xs = new float[n * dm];
        EmbeddingReference.Forward(tokens, w("model.embed_tokens.weight"), xs, dm);
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var hn = Norm(xs, p + "input_layernorm.weight");
            var q = Linear(hn, p + "self_attn.q_proj.weight", h * d, dm);
            var k = Linear(hn, p + "self_attn.k_proj.weight", hkv * d, dm);
            var v = Linear(hn, p + "self_attn.v_proj.weight", hkv * d, dm);
            if (c.QkvBias)
            {
                // Qwen2: a bias on each of q, k and v, added to every position.
                foreach (var (y, name) in new[] { (q, "q_proj"), (k, "k_proj"), (v, "v_proj") })
                {
                    var b = w(p + $"self_attn.{name}.bias");
                    for (int i = 0; i < y.Length; i++) y[i] += b[i % b.Length];
                }
            }

            if (c.QkNorm)
            {
                // Qwen3: every head of q and k RMS-normalised over D (weights (D)) before RoPE.
                float[] HeadNorm(float[] x, string name)
                {
                    var y = new float[x.Length];
                    RmsNormReference.Forward(x, w(name), y, new float[x.Length / d], x.Length / d, d, c.RmsNormEps);
                    return y;
                }

                q = HeadNorm(q, p + "self_attn.q_norm.weight");
                k = HeadNorm(k, p + "self_attn.k_norm.weight");
            }

            var qr = new float[q.Length];
            var kr = new float[k.Length];
            RopeReference.Forward(q, pos, qr, n, h, d, c.RopeTheta, false, c.RopeScaling);
            RopeReference.Forward(k, pos, kr, n, hkv, d, c.RopeTheta, false, c.RopeScaling);
            var o = new float[q.Length];
            AttentionReference.Forward(qr, kr, v, o, new float[batch * h * t], new AttentionShape(batch, t, t, h, hkv, d, true, (float)(1 / Math.Sqrt(d)), c.SlidingWindow ?? 0));
            var attn = Linear(o, p + "self_attn.o_proj.weight", dm, h * d);
            var x1 = new float[xs.Length];
            ElementwiseReference.Add(xs, attn, x1);
            var h2 = Norm(x1, p + "post_attention_layernorm.weight");
            var act = new float[n * inter];
            ElementwiseReference.SwiGlu(Linear(h2, p + "mlp.gate_proj.weight", inter, dm), Linear(h2, p + "mlp.up_proj.weight", inter, dm), act);
            var x2 = new float[xs.Length];
            ElementwiseReference.Add(x1, Linear(act, p + "mlp.down_proj.weight", dm, inter), x2);
            xs = x2;
        }

        return Linear(Norm(xs, "model.norm.weight"), c.TieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight", c.VocabSize, dm);
    }
}

public sealed class KvCacheTests
{
    [TestCaseSource(typeof(TestBackends), nameof(TestBackends.All))]
    public void DecodeWithCache_EqualsFullRecomputation(string backend)
    {
        var device = TestBackends.Get(backend);
        var config = LlamaConfig.Tiny with { NumHiddenLayers = 2, HiddenSize = 32, IntermediateSize = 40, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 37 };
        using var model = LlamaModel.Create(device, config, seed: 4);
        var tokens = new[] { 3, 14, 15, 9, 2, 6, 5, 35 };
        var full = model.Logits(tokens, batch: 1);
        using var cache = new KvCache(model, 16);
        // Prefill 3 tokens, then one at a time: every step's logits equal the full pass at that position.
        var step = model.DecodeStep(cache, tokens[..3]);
        Check.Close(step, full.AsSpan(2 * 37, 37), (2e-5, 2e-4), $"{backend} prefill");
        for (int i = 3; i < tokens.Length; i++)
        {
            step = model.DecodeStep(cache, new[] { tokens[i] });
            Check.Close(step, full.AsSpan(i * 37, 37), (2e-5, 2e-4), $"{backend} position {i}");
        }

        Assert.That(cache.Length, Is.EqualTo(tokens.Length));
        Assert.Throws<ArgumentException>(() => model.DecodeStep(cache, new int[9]));
    }
}
