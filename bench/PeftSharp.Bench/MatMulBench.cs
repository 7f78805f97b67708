using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using Microsoft.ML.OnnxRuntime;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Bench;

/// <summary>One matmul shape: y (M, N) = x (M, K) times a weight. Weights are (N, K) as Hugging Face stores them.</summary>
public sealed record MatMulCase(int M, int N, int K)
{
    public double Flops => 2.0 * M * N * K;

    public override string ToString() => $"M{M}_N{N}_K{K}";
}

/// <summary>
/// y = x W^T, the linear layer, on square shapes and LLM shapes (M = 1 .. 512 rows against K = N = 2048). Each system
/// gets the weight in its preferred layout: the CPU backend and OpenCL read W (N, K) transposed, ONNX Runtime gets
/// W^T (K, N) as a constant initializer (which it prepacks). The naive loop is what a user writes without a library.
/// </summary>
[Config(typeof(Config))]
public class MatMulBench
{
    private Device cpu = null!;
    private Device? opencl;
    private Tensor x = null!, w = null!, y = null!;
    private Tensor? clx, clw, cly;
    private InferenceSession? ort;
    private OrtValue? ortIn, ortOut;
    private RunOptions? runOptions;
    private float[] xs = null!, ws = null!, naiveOut = null!;

    public static IEnumerable<MatMulCase> Cases() => new[]
    {
        new MatMulCase(512, 512, 512), new MatMulCase(1024, 1024, 1024), new MatMulCase(2048, 2048, 2048),
        new MatMulCase(1, 2048, 2048), new MatMulCase(16, 2048, 2048), new MatMulCase(128, 2048, 2048), new MatMulCase(512, 2048, 2048),
    };

    [ParamsSource(nameof(Cases))]
    public MatMulCase Shape { get; set; } = null!;

    [GlobalSetup]
    public void Setup()
    {
        var s = Shape;
        xs = Validate.Uniform(s.M * s.K, 1);
        ws = Validate.Uniform(s.N * s.K, 2);
        naiveOut = new float[s.M * s.N];
        double Expected(int i)
        {
            int r = i / s.N, c = i % s.N;
            double acc = 0;
            for (int p = 0; p < s.K; p++) acc += (double)xs[r * s.K + p] * ws[c * s.K + p];
            return acc;
        }

        double tol = 1e-4;
        cpu = new CpuDevice();
        x = cpu.FromArray("x", xs, s.M, s.K);
        w = cpu.FromArray("w", ws, s.N, s.K);
        y = cpu.Zeros("y", s.M, s.N);
        CpuBackend();
        Validate.Sampled("cpu matmul", y.ToArray(), Expected, tol);

        try
        {
            opencl = Devices.Open("opencl");
            clx = opencl.FromArray("x", xs, s.M, s.K);
            clw = opencl.FromArray("w", ws, s.N, s.K);
            cly = opencl.Zeros("y", s.M, s.N);
            OpenClPoCL();
            Validate.Sampled("opencl matmul", cly.ToArray(), Expected, tol);
        }
        catch (ArgumentException e)
        {
            Console.WriteLine($"// OpenCL not available, its rows will be NA: {e.Message}");
            opencl = null;
        }

        var wt = new float[s.K * s.N];
        for (int n = 0; n < s.N; n++)
        for (int k = 0; k < s.K; k++)
            wt[k * s.N + n] = ws[n * s.K + k];
        var model = new OnnxGraph().Input("x", s.M, s.K).Constant("wt", wt, s.K, s.N).Output("y", s.M, s.N)
            .Node("MatMul", new[] { "x", "wt" }, new[] { "y" }).ToModel();
        ort = new InferenceSession(model, OrtThreads());
        ortIn = OrtValue.CreateTensorValueFromMemory(xs, new long[] { s.M, s.K });
        ortOut = OrtValue.CreateTensorValueFromMemory(new float[s.M * s.N], new long[] { s.M, s.N });
        runOptions = new RunOptions();
        OnnxRuntime();
        Validate.Sampled("onnxruntime matmul", ortOut.GetTensorDataAsSpan<float>().ToArray(), Expected, tol);

        if (NaiveAffordable) NaiveLoop();
        if (NaiveAffordable) Validate.Sampled("naive matmul", naiveOut, Expected, tol);
    }

    internal static SessionOptions OrtThreads() => new()
    {
        IntraOpNumThreads = Environment.ProcessorCount,
        InterOpNumThreads = 1,
        GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
    };

    private bool NaiveAffordable => Shape.Flops <= 2.0 * 1024 * 1024 * 1024;

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var d in new IDisposable?[] { x, w, y, clx, clw, cly, ortIn, ortOut, runOptions, ort, opencl, cpu }) d?.Dispose();
    }

    [Benchmark(Baseline = true, Description = "CPU backend")]
    public void CpuBackend() => cpu.Ops.Linear(x, w, y);

    [Benchmark(Description = "ONNX Runtime")]
    public void OnnxRuntime() => ort!.Run(runOptions, new[] { "x" }, new[] { ortIn! }, new[] { "y" }, new[] { ortOut! });

    [Benchmark(Description = "OpenCL (PoCL)")]
    public void OpenClPoCL()
    {
        if (opencl == null) throw new InvalidOperationException("OpenCL not available");
        opencl.Ops.Linear(clx!, clw!, cly!);
        opencl.Synchronize();
    }

    /// <summary>Row-times-row dot products in plain C#, single thread (shapes up to 2 GFLOP only: it is slow).</summary>
    [Benchmark(Description = "naive C# loop")]
    public void NaiveLoop()
    {
        if (!NaiveAffordable) throw new InvalidOperationException("naive loop skipped above 2 GFLOP");
        int m = Shape.M, n = Shape.N, k = Shape.K;
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            float acc = 0;
            for (int p = 0; p < k; p++) acc += xs[i * k + p] * ws[j * k + p];
            naiveOut[i * n + j] = acc;
        }
    }

    private sealed class Config : BenchConfig
    {
        public Config()
        {
            AddColumn(RateColumn.Flops(c => ((MatMulCase)c.Parameters["Shape"]).Flops, false));
            AddColumn(RateColumn.Flops(c => ((MatMulCase)c.Parameters["Shape"]).Flops, true));
            WithOrderer(new BenchmarkDotNet.Order.DefaultOrderer(BenchmarkDotNet.Order.SummaryOrderPolicy.Declared));
        }
    }
}
