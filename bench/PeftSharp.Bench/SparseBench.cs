using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;
using PeftSharp.Training;
using PeftSharp.Variants;

namespace PeftSharp.Bench;

/// <summary>
/// One training step (forward, backward, optimizer) of the 20M-parameter model on B = 8 x T = 128 tokens: full
/// fine-tuning (AdamW on everything), LoRA with the rank whose trainable count is about 1% of the model, and sparse
/// fine-tuning at 1% density (masked AdamW). The "optimizer state" column is the state each optimizer holds, read from
/// it after the run.
/// </summary>
[Config(typeof(Config))]
public class SparseTrainingBench
{
    private const int Batch = 8, SeqLen = 128;
    private static readonly Dictionary<string, long> StateBytes = new();
    private Device device = null!;
    private LlamaModel model = null!;
    private Optimizer optimizer = null!;
    private int[] tokens = null!, targets = null!;

    [Params("full", "lora", "sparse-1%")]
    public string Method { get; set; } = "full";

    [GlobalSetup]
    public void Setup()
    {
        device = new CpuDevice();
        model = LlamaModel.Create(device, ModelBench.ConfigFor("20M"), seed: 1);
        var rng = new Random(2);
        tokens = Enumerable.Range(0, Batch * SeqLen).Select(_ => rng.Next(256)).ToArray();
        targets = tokens.Skip(1).Append(-100).ToArray();
        switch (Method)
        {
            case "full":
                optimizer = new AdamW(model.Parameters);
                break;
            case "lora":
                // Rank 3 on every linear layer: about 1% of the 20M model's parameters train, as with the sparse mask.
                model.AddLora(new LoraAdapterConfig { R = 3, LoraAlpha = 6, TargetRegex = "all-linear" }, seed: 3);
                optimizer = new AdamW(model.AllParameters);
                break;
            default:
                var masks = SparseMasks.Select(model, 0.01, MaskSource.Weight, seed: 3);
                optimizer = new MaskedAdamW(model.AllParameters, masks);
                break;
        }

        Step();
        long trainable = Method == "sparse-1%" ? ((MaskedAdamW)optimizer).StateFloats / 2 : model.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        long state = optimizer.ExportState().Sum(s => (long)s.Values.Length) * 4;
        StateBytes[Method] = state;
        Console.WriteLine($"// {Method}: {trainable:N0} trainable of {model.ParameterCount:N0}; optimizer state {state:N0} bytes");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        optimizer.Dispose();
        model.Dispose();
        device.Dispose();
    }

    [Benchmark(Description = "training step")]
    public void Step()
    {
        model.ZeroGrad();
        model.Loss(tokens, targets, Batch, backward: true);
        optimizer.Step(1e-4f);
    }

    private sealed class Config : BenchConfig
    {
        public Config() => AddColumn(new StateColumn());
    }

    private sealed class StateColumn() : CustomColumn("OptimizerState", "bytes of optimizer state after a step", unit: UnitType.Size)
    {
        public override string ColumnName => "optimizer state";

        public override string GetValue(Summary summary, BenchmarkCase c) =>
            StateBytes.TryGetValue((string)c.Parameters["Method"], out long b) ? $"{b / 1048576.0:F2} MiB" : "-";
    }
}

/// <summary>
/// A decode step of 32 rows over 8 sparse fine-tunes (1% density) of one 2048 x 2048 layer: the base product once plus
/// the per-row sparse product from the variants' CSR pool, against a dense fp32 weight per variant and the base alone.
/// </summary>
[Config(typeof(BenchConfig))]
public class SparseServingBench
{
    private const int Rows = 32, Hidden = 2048, Variants = 8;
    private Device device = null!;
    private Tensor x = null!, w = null!, y = null!;
    private SparseDeltaPool pool = null!;
    private IndexTensor rowVariants = null!;
    private Tensor[] dense = null!;
    private VariantGroups groups = null!;

    [GlobalSetup]
    public void Setup()
    {
        device = new CpuDevice();
        var xs = Validate.Uniform(Rows * Hidden, 1);
        var ws = Validate.Uniform(Hidden * Hidden, 2).Select(v => v * 0.02f).ToArray();
        var deltas = Enumerable.Range(0, Variants).Select(v =>
        {
            var rng = new Random(10 + v);
            var idx = Enumerable.Range(0, Hidden * Hidden).Where(_ => rng.NextDouble() < 0.01).ToArray();
            return new SparseDeltaData($"v{v}", idx, idx.Select(_ => (float)(rng.NextDouble() - 0.5) * 0.01f).ToArray());
        }).ToArray();
        var assignment = Enumerable.Range(0, Rows).Select(i => i % Variants).ToArray();
        x = device.FromArray("x", xs, Rows, Hidden);
        w = device.FromArray("w", ws, Hidden, Hidden);
        y = device.Zeros("y", Rows, Hidden);
        pool = SparseDeltaPool.Create(device, Hidden, Hidden, deltas);
        rowVariants = device.FromIndices("rows", assignment);
        dense = deltas.Select(d =>
        {
            var t = device.FromArray("w_variant", ws, Hidden, Hidden);
            using var idx = device.FromIndices("idx", d.Index);
            using var val = device.FromArray("val", d.Values, d.Values.Length);
            device.Ops.ScatterAdd(t, idx, val);
            return t;
        }).ToArray();
        groups = new VariantGroups(device, xs, assignment, Variants, Hidden);
        Fused();
        var fused = y.ToArray();
        DensePerVariant();
        var viaDense = groups.Scatter(Rows);
        Validate.Sampled("sparse mixed vs dense per variant", fused, i => viaDense[i], 1e-4);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var d in dense) d.Dispose();
        foreach (var d in new IDisposable[] { groups, x, w, y, pool, rowVariants, device }) d.Dispose();
    }

    [Benchmark(Baseline = true, Description = "base matmul only (floor)")]
    public void BaseOnly() => device.Ops.Linear(x, w, y);

    [Benchmark(Description = "fused: base once + sparse product")]
    public void Fused()
    {
        device.Ops.Linear(x, w, y);
        device.Ops.SparseDeltaMixed(x, y, pool, rowVariants);
    }

    [Benchmark(Description = "dense fp32 weight per variant")]
    public void DensePerVariant()
    {
        foreach (var g in groups.Groups) device.Ops.Linear(g.X, dense[g.Variant], g.Y);
    }
}

/// <summary>
/// Merging four fine-tunes of the 20M model into one with TIES and with task arithmetic (host code, double
/// accumulation); GB/s counts the bytes of the base and the four inputs read once, against the bandwidth probe.
/// </summary>
[Config(typeof(Config))]
public class MergeBench
{
    private const int Inputs = 4;
    private float[][] models = null!;
    private float[] baseValues = null!;
    private MergeInput[] inputs = null!;

    [Params("task_arithmetic", "ties")]
    public string Method { get; set; } = "ties";

    [GlobalSetup]
    public void Setup()
    {
        // The 20M model's largest tensor type, one MLP weight (1376 x 512), stands for the per-tensor work; the figure
        // scales with the byte count.
        const int n = 1376 * 512;
        baseValues = Validate.Uniform(n, 1);
        models = Enumerable.Range(0, Inputs).Select(i => Validate.Uniform(n, 10 + i)).ToArray();
        inputs = Enumerable.Range(0, Inputs).Select(_ => new MergeInput(0.25f, 0.2f)).ToArray();
    }

    /// <summary>parallel = <see cref="TaskVectorMerge.Merge"/>; reference = the single-threaded specification it equals bit for bit.</summary>
    [Params("parallel", "reference")]
    public string Impl { get; set; } = "parallel";

    [Benchmark(Description = "merge one 1376 x 512 tensor of 4 models")]
    public float[] Merge()
    {
        var method = Method == "ties" ? MergeMethod.Ties : MergeMethod.TaskArithmetic;
        return Impl == "parallel"
            ? TaskVectorMerge.Merge(method, baseValues, models, inputs, true, 1f, seed: 1)
            : TaskVectorMerge.MergeReference(method, baseValues, models, inputs, true, 1f, seed: 1);
    }

    private sealed class Config : BenchConfig
    {
        public Config()
        {
            AddColumn(RateColumn.Bandwidth(_ => (Inputs + 1) * 1376.0 * 512 * 4, false));
            AddColumn(RateColumn.Bandwidth(_ => (Inputs + 1) * 1376.0 * 512 * 4, true));
        }
    }
}
