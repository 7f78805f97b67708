using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using Microsoft.ML.OnnxRuntime;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Bench;

/// <summary>
/// The whole model on the CPU backend: a training step (forward, backward, AdamW) and a prefill forward over B=8 x
/// T=128 tokens, one decode step with a KV cache at 128 positions, and ONNX Runtime running the same forward exported
/// as an ONNX graph (validated against our logits in setup). Tokens/s is the figure to read.
/// </summary>
[Config(typeof(Config))]
public class ModelBench
{
    public const int Batch = 8, SeqLen = 128;

    private Device device = null!;
    private LlamaModel model = null!;
    private AdamW optimizer = null!;
    private int[] tokens = null!, targets = null!;
    private InferenceSession ort = null!;
    private OrtValue ortIn = null!, ortOut = null!;
    private RunOptions runOptions = null!;
    private KvCache cache = null!;

    [Params("tiny", "20M")]
    public string Size { get; set; } = "tiny";

    public static LlamaConfig ConfigFor(string size) => size == "tiny"
        ? LlamaConfig.Tiny
        : new LlamaConfig
        {
            HiddenSize = 512, IntermediateSize = 1376, NumAttentionHeads = 8, NumKeyValueHeads = 4, NumHiddenLayers = 7,
            VocabSize = 259, RmsNormEps = 1e-5f, MaxPositionEmbeddings = 512, TieWordEmbeddings = true,
        };

    [GlobalSetup]
    public void Setup()
    {
        device = new CpuDevice();
        model = LlamaModel.Create(device, ConfigFor(Size), seed: 1);
        Console.WriteLine($"// {Size}: {model.ParameterCount:N0} parameters");
        optimizer = new AdamW(model.Parameters);
        var rng = new Random(2);
        tokens = Enumerable.Range(0, Batch * SeqLen).Select(_ => rng.Next(256)).ToArray();
        targets = tokens.Skip(1).Append(-100).ToArray();
        var ours = model.Logits(tokens, Batch);

        ort = new InferenceSession(LlamaOnnx.Export(model, Batch, SeqLen), MatMulBench.OrtThreads());
        ortIn = OrtValue.CreateTensorValueFromMemory(tokens.Select(t => (long)t).ToArray(), new long[] { Batch, SeqLen });
        ortOut = OrtValue.CreateTensorValueFromMemory(new float[ours.Length], new long[] { Batch, SeqLen, model.Config.VocabSize });
        runOptions = new RunOptions();
        OnnxRuntimeForward();
        var theirs = ortOut.GetTensorDataAsSpan<float>().ToArray();
        Validate.Sampled("onnxruntime llama forward vs PeftSharp", theirs, i => ours[i], 1e-3, samples: 256);
        cache = new KvCache(model, SeqLen + 1);
        model.DecodeStep(cache, tokens[..SeqLen]);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var d in new IDisposable[] { cache, ortIn, ortOut, runOptions, ort, optimizer, model, device }) d.Dispose();
    }

    [Benchmark(Description = "PeftSharp train step (fwd+bwd+AdamW)")]
    public void TrainStep()
    {
        model.ZeroGrad();
        model.Loss(tokens, targets, Batch, backward: true);
        optimizer.Step(1e-4f);
    }

    [Benchmark(Baseline = true, Description = "PeftSharp forward")]
    public float[] Forward() => model.Logits(tokens, Batch);

    [Benchmark(Description = "ONNX Runtime forward")]
    public void OnnxRuntimeForward() => ort.Run(runOptions, new[] { "input_ids" }, new[] { ortIn }, new[] { "logits" }, new[] { ortOut });

    /// <summary>One new token against a 128-position cache (the cache is rewound each time, so the shape is fixed).</summary>
    [Benchmark(Description = "PeftSharp decode step (KV cache, 1 token)")]
    public float[] DecodeStep()
    {
        cache.Truncate(SeqLen);
        return model.DecodeStep(cache, new[] { 42 });
    }

    private sealed class Config : BenchConfig
    {
        public Config() => AddColumn(new TokensPerSecondColumn());
    }

    private sealed class TokensPerSecondColumn() : CustomColumn("TokensPerSecond", "tokens processed per second (B x T per call; 1 for a decode step)")
    {
        public override string ColumnName => "tokens/s";

        public override string GetValue(Summary summary, BenchmarkCase benchmarkCase)
        {
            var stats = summary[benchmarkCase]?.ResultStatistics;
            if (stats == null) return "-";
            double tokensPerCall = benchmarkCase.Descriptor.WorkloadMethod.Name == nameof(DecodeStep) ? 1 : Batch * SeqLen;
            return $"{tokensPerCall / (stats.Mean / 1e9):N0}";
        }
    }
}
