using System.Buffers.Binary;
using System.Text;
using NUnit.Framework;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Formats;

public sealed class PeftLoraAdapterTests : TempDirectoryTest
{
    private static readonly LlamaConfig Model = LlamaConfig.Tiny; // hidden 64, 4 heads x 16, 2 KV heads, 2 layers

    /// <summary>adapter_config.json as PEFT 0.13 writes it (fields we ignore included).</summary>
    private const string PeftConfig = """
        {
          "alpha_pattern": {},
          "auto_mapping": null,
          "base_model_name_or_path": "peftsharp/tiny",
          "bias": "none",
          "fan_in_fan_out": false,
          "inference_mode": true,
          "init_lora_weights": true,
          "layer_replication": null,
          "layers_pattern": null,
          "layers_to_transform": null,
          "loftq_config": {},
          "lora_alpha": 16,
          "lora_dropout": 0.05,
          "megatron_config": null,
          "megatron_core": "megatron.core",
          "modules_to_save": null,
          "peft_type": "LORA",
          "r": 2,
          "rank_pattern": {},
          "revision": null,
          "target_modules": ["v_proj", "q_proj"],
          "task_type": "CAUSAL_LM",
          "use_dora": false,
          "use_rslora": false
        }
        """;

    /// <summary>Writes adapter_model.safetensors byte by byte: header with PEFT's keys, then little-endian F32 data.</summary>
    private static Dictionary<string, float[]> WriteFolder(string folder, string config, Func<string, long[], long[]>? reshape = null, string? extraKey = null, string? dropKey = null)
    {
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), config);
        var tensors = new List<(string Key, long[] Shape, float[] Data)>();
        int seed = 1;
        for (int l = 0; l < 2; l++)
        {
            foreach (var (proj, outF) in new[] { ("q_proj", 64L), ("v_proj", 32L) })
            {
                string m = $"base_model.model.model.layers.{l}.self_attn.{proj}";
                tensors.Add(($"{m}.lora_A.weight", new[] { 2L, 64 }, TestData.Uniform(2 * 64, seed++)));
                tensors.Add(($"{m}.lora_B.weight", new[] { outF, 2 }, TestData.Uniform((int)outF * 2, seed++)));
            }
        }

        if (extraKey != null) tensors.Add((extraKey, new[] { 2L }, new float[2]));
        tensors.RemoveAll(t => t.Key == dropKey);
        if (reshape != null)
        {
            // A reshaped tensor gets data of its new size, so the file stays valid safetensors and the adapter check is what fails.
            tensors = tensors.Select(t =>
            {
                var shape = reshape(t.Key, t.Shape);
                long n = shape.Aggregate(1L, (a, b) => a * b);
                return (t.Key, shape, n == t.Data.Length ? t.Data : new float[n]);
            }).ToList();
        }
        var header = new StringBuilder("{\"__metadata__\":{\"format\":\"pt\"}");
        long offset = 0;
        foreach (var t in tensors)
        {
            header.Append($",\"{t.Key}\":{{\"dtype\":\"F32\",\"shape\":[{string.Join(",", t.Shape)}],\"data_offsets\":[{offset},{offset + t.Data.Length * 4}]}}");
            offset += t.Data.Length * 4;
        }

        header.Append('}');
        while ((header.Length) % 8 != 0) header.Append(' ');
        var bytes = new List<byte>(new byte[8]);
        BinaryPrimitives.WriteUInt64LittleEndian(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(bytes), (ulong)header.Length);
        bytes.AddRange(Encoding.UTF8.GetBytes(header.ToString()));
        foreach (var t in tensors)
        {
            foreach (float v in t.Data) bytes.AddRange(BitConverter.GetBytes(v));
        }

        File.WriteAllBytes(Path.Combine(folder, "adapter_model.safetensors"), bytes.ToArray());
        return tensors.ToDictionary(t => t.Key, t => t.Data);
    }

    [Test]
    public void PeftFolder_WrittenByteByByte_LoadsWithPeftScaling()
    {
        var written = WriteFolder(TempDir, PeftConfig);
        var adapter = PeftLoraAdapter.Load(TempDir, Model);
        Assert.That(adapter.Modules.Keys.Order(), Is.EqualTo(new[]
        {
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
        }));
        Assert.That(adapter.Modules["model.layers.1.self_attn.v_proj"].B, Is.EqualTo(written["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]));
        Assert.That(adapter.Config.Scale("model.layers.0.self_attn.q_proj"), Is.EqualTo(8f), "lora_alpha / r = 16 / 2");
        Assert.That(adapter.Config with { UseRsLora = true }, Has.Property("R").EqualTo(2));
        Assert.That((adapter.Config with { UseRsLora = true }).Scale("model.layers.0.self_attn.q_proj"), Is.EqualTo(16f / MathF.Sqrt(2)).Within(1e-6));
    }

    [Test]
    public void SaveThenLoad_IsExact_AndKeysArePefts()
    {
        WriteFolder(Path.Combine(TempDir, "in"), PeftConfig);
        var adapter = PeftLoraAdapter.Load(Path.Combine(TempDir, "in"), Model);
        string outDir = Path.Combine(TempDir, "out");
        adapter.Save(outDir, Model);
        using (var f = SafeTensorsFile.Open(Path.Combine(outDir, "adapter_model.safetensors")))
        {
            Assert.That(f.Tensors.Select(t => t.Name), Does.Contain("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
            Assert.That(f.Tensors.Select(t => t.Name), Has.None.Contains(".default."));
        }

        var again = PeftLoraAdapter.Load(outDir, Model);
        foreach (var (m, (a, b)) in adapter.Modules)
        {
            Assert.That(again.Modules[m].A, Is.EqualTo(a), m);
            Assert.That(again.Modules[m].B, Is.EqualTo(b), m);
        }
    }

    /// <summary>
    /// Built in code the config has the host's defaults (r 8, alpha 16, every linear layer) and is written as
    /// "all-linear"; read from a file, PEFT's own defaults for a missing r and lora_alpha (8, 8) hold, and an empty
    /// target list (which PEFT rejects) is refused rather than read as "all".
    /// </summary>
    [Test]
    public void Defaults_InCodeAreTheHosts_InFilesArePefts()
    {
        var config = new LoraAdapterConfig();
        Assert.That((config.R, config.LoraAlpha), Is.EqualTo((8, 16f)), "the host's --rank 8 and --alpha 16");
        Assert.That(config.TargetsIn(Model), Is.EqualTo(LoraAdapterConfig.LlamaLinearModules(Model)), "no targets named: every linear layer");
        var modules = config.TargetsIn(Model).ToDictionary(m => m, m =>
        {
            var (o, i) = PeftLoraAdapter.LinearShape(Model, m);
            return (new float[8 * i], new float[o * 8]);
        });
        new PeftLoraAdapter(config, modules).Save(Path.Combine(TempDir, "defaults"), Model);
        Assert.That(File.ReadAllText(Path.Combine(TempDir, "defaults", "adapter_config.json")), Does.Contain("\"target_modules\": \"all-linear\""));
        using var device = new PeftSharp.Engine.Cpu.CpuDevice();
        using var model = LlamaModel.Create(device, Model, 1);
        Assert.That(PeftLoraAdapter.Load(Path.Combine(TempDir, "defaults"), model).Config.TargetsIn(Model).Count(), Is.EqualTo(14), "Load(folder, model) as the delta loaders");

        var bare = PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": ["q_proj"]}""", "bare");
        Assert.That((bare.R, bare.LoraAlpha), Is.EqualTo((8, 8f)), "PEFT's LoraConfig defaults");
        string emptyTargets = PeftConfig.Replace("\"target_modules\": [\"v_proj\", \"q_proj\"],", "\"target_modules\": [],");
        var empty = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(emptyTargets, "empty.json"))!;
        Assert.That(empty.Message, Does.Contain("target_modules is an empty list"));
    }

    [Test]
    public void TargetSelection_AllLinearRegexLayersAndRankPattern()
    {
        var cfg = PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": "all-linear"}""", "cfg");
        Assert.That(cfg.TargetsIn(Model).Count(), Is.EqualTo(14));
        cfg = PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": ".*\\.mlp\\.(up|down)_proj", "layers_to_transform": [1]}""", "cfg");
        Assert.That(cfg.TargetsIn(Model), Is.EqualTo(new[] { "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj" }));
        cfg = PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": ["q_proj"], "r": 8, "lora_alpha": 16, "rank_pattern": {"model.layers.1.self_attn.q_proj": 4}}""", "cfg");
        Assert.That(cfg.For("model.layers.1.self_attn.q_proj").Rank, Is.EqualTo(4));
        Assert.That(cfg.Scale("model.layers.0.self_attn.q_proj"), Is.EqualTo(2f));
    }

    /// <summary>
    /// rank_pattern and alpha_pattern keys are regular expressions matched as PEFT's get_pattern_key matches them
    /// (re.match(rf"(.*\.)?({key})$", module)): the documented anchored form selects one module, a suffix selects every
    /// module ending in it, the first key that matches wins; a key that is not a regex is refused by name.
    /// </summary>
    [Test]
    public void PatternKeys_MatchAsPeftsGetPatternKey()
    {
        var cfg = PeftLoraAdapter.ParseConfig("""
            {"peft_type": "LORA", "target_modules": "all-linear", "r": 8, "lora_alpha": 16,
             "rank_pattern": {"^model.layers.0.self_attn.q_proj": 4, "down_proj": 2},
             "alpha_pattern": {"^model.layers.1.mlp.(up|gate)_proj": 32, "layers.1.mlp.up_proj": 64}}
            """, "cfg");
        Assert.That(cfg.For("model.layers.0.self_attn.q_proj"), Is.EqualTo((4, 16f)), "the anchored key");
        Assert.That(cfg.For("model.layers.1.self_attn.q_proj"), Is.EqualTo((8, 16f)), "the anchored key selects layer 0 only");
        Assert.That(cfg.For("model.layers.0.mlp.down_proj"), Is.EqualTo((2, 16f)), "a suffix key, every layer");
        Assert.That(cfg.For("model.layers.1.mlp.down_proj"), Is.EqualTo((2, 16f)));
        Assert.That(cfg.For("model.layers.1.mlp.up_proj"), Is.EqualTo((8, 32f)), "the first matching key wins");
        Assert.That(cfg.For("model.layers.1.mlp.gate_proj"), Is.EqualTo((8, 32f)));
        Assert.That(cfg.For("model.layers.0.mlp.up_proj"), Is.EqualTo((8, 16f)));
        Assert.That(cfg.For("model.layers.0.self_attn.o_proj"), Is.EqualTo((8, 16f)), "'o_proj' is not a match for a key ending in q_proj");
        var bad = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
            """{"peft_type": "LORA", "target_modules": "all-linear", "rank_pattern": {"layers.(0": 4}}""", "adapter_config.json"))!;
        Assert.That(bad.Message, Does.Contain("rank_pattern key 'layers.(0'"));
    }

    /// <summary>
    /// Initialisations after which PEFT's loader changes the base weights too, and activated LoRA, would be merged
    /// into another model as W + s B A: refused naming the option. Those that only start the factors are read.
    /// </summary>
    [Test]
    public void InitialisationsThatChangeTheBase_AndActivatedLora_AreRefusedByName()
    {
        foreach (var init in new[] { "pissa", "pissa_niter_16", "olora", "corda", "loftq", "eva" })
        {
            var e = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
                $$"""{"peft_type": "LORA", "target_modules": "all-linear", "init_lora_weights": "{{init}}"}""", "adapter_config.json"))!;
            Assert.That(e.Message, Does.Contain("init_lora_weights").And.Contain($"'{init}'"), init);
        }

        foreach (var init in new[] { "true", "false", "\"gaussian\"" })
        {
            Assert.DoesNotThrow(() => PeftLoraAdapter.ParseConfig($$"""{"peft_type": "LORA", "target_modules": "all-linear", "init_lora_weights": {{init}}}""", "cfg"), init);
        }

        var alora = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
            """{"peft_type": "LORA", "target_modules": "all-linear", "alora_invocation_tokens": [5, 6]}""", "adapter_config.json"))!;
        Assert.That(alora.Message, Does.Contain("alora_invocation_tokens"));
        Assert.DoesNotThrow(() => PeftLoraAdapter.ParseConfig("""{"peft_type": "LORA", "target_modules": "all-linear", "alora_invocation_tokens": null}""", "cfg"));
    }

    [Test]
    public void Mismatches_EveryOffenderListed()
    {
        WriteFolder(TempDir, PeftConfig,
            reshape: (k, s) => k.EndsWith("layers.1.self_attn.q_proj.lora_B.weight", StringComparison.Ordinal) ? new[] { 63L, 2 } : s,
            extraKey: "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            dropKey: "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
        var e = Assert.Throws<PeftSharpInputException>(() => PeftLoraAdapter.Load(TempDir, Model))!;
        Assert.That(e.Message, Does.Contain("missing base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight [2, 64]")
            .And.Contain("layers.1.self_attn.q_proj.lora_B.weight is [63, 2], expected [64, 2]")
            .And.Contain("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight matches no targeted module"));
    }

    [Test]
    public void UnsupportedOptions_AllNamedInOneError()
    {
        var e = Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig(
            """{"peft_type": "LORA", "target_modules": ["q_proj", "c_attn"], "fan_in_fan_out": true, "bias": "all", "modules_to_save": ["lm_head"]}""", "adapter_config.json"))!;
        Assert.That(e.Message, Does.Contain("fan_in_fan_out").And.Contain("bias = 'all'").And.Contain("modules_to_save [lm_head]").And.Contain("c_attn"));
        Assert.Throws<NotSupportedException>(() => PeftLoraAdapter.ParseConfig("""{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}""", "x"));
    }
}
