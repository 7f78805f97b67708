using BenchmarkDotNet.Attributes;
using Microsoft.ML.OnnxRuntime;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Attention;

namespace PeftSharp.Bench;

/// <summary>
/// Causal self-attention, B=8 H=8 T=512 D=64 (Hkv = H). The CPU backend's blocked online-softmax attention against
/// ONNX Runtime running the plain graph (MatMul, Mul, Add mask, Softmax, MatMul) on (B, H, T, D) inputs, the naive
/// loop a user would write (full T x T score matrix per head, one thread), and the ILGPU kernel on PoCL.
/// FLOPs counted are the useful causal ones: 2 * B * H * T^2 * D (two matmuls over half the matrix).
/// </summary>
[Config(typeof(Config))]
public class AttentionBench
{
    private const int B = 8, H = 8, T = 512, D = 64;
    private static readonly AttentionShape Shape = new(B, T, T, H, H, D, true, 0.125f);
    private Device cpu = null!;
    private Device? opencl;
    private Tensor q = null!, k = null!, v = null!, o = null!, lse = null!;
    private Tensor? cq, ck, cv, co, cl;
    private float[] qs = null!, ks = null!, vs = null!, naiveOut = null!;
    private InferenceSession ort = null!;
    private OrtValue[] ortIn = null!;
    private OrtValue ortOut = null!;
    private RunOptions runOptions = null!;
    private float[] expected = null!;

    [GlobalSetup]
    public void Setup()
    {
        qs = Validate.Uniform(B * T * H * D, 1);
        ks = Validate.Uniform(B * T * H * D, 2);
        vs = Validate.Uniform(B * T * H * D, 3);
        expected = new float[qs.Length];
        AttentionReference.Forward(qs, ks, vs, expected, new float[B * H * T], Shape);
        cpu = new CpuDevice();
        (q, k, v, o, lse) = Upload(cpu);
        CpuBackend();
        Validate.Sampled("cpu attention", o.ToArray(), i => expected[i], 1e-4);
        try
        {
            opencl = Devices.Open("opencl");
            (cq, ck, cv, co, cl) = Upload(opencl);
            OpenClPoCL();
            Validate.Sampled("opencl attention", co.ToArray(), i => expected[i], 1e-4);
        }
        catch (ArgumentException e)
        {
            Console.WriteLine($"// OpenCL not available: {e.Message}");
            opencl = null;
        }

        // ONNX Runtime gets (B, H, T, D): the layout its MatMul-based graph wants, transposed here, outside the timing.
        var mask = new float[T * T];
        for (int i = 0; i < T; i++)
        for (int j = i + 1; j < T; j++)
            mask[i * T + j] = float.NegativeInfinity;
        var model = new OnnxGraph()
            .Input("q", B, H, T, D).Input("k", B, H, T, D).Input("v", B, H, T, D).Output("o", B, H, T, D)
            .Constant("mask", mask, T, T).Constant("scale", new[] { Shape.Scale })
            .Node("Transpose", new[] { "k" }, new[] { "kt" }, "", ("perm", new long[] { 0, 1, 3, 2 }))
            .Node("MatMul", new[] { "q", "kt" }, new[] { "s" })
            .Node("Mul", new[] { "s", "scale" }, new[] { "ss" })
            .Node("Add", new[] { "ss", "mask" }, new[] { "sm" })
            .Node("Softmax", new[] { "sm" }, new[] { "p" }, "", ("axis", -1))
            .Node("MatMul", new[] { "p", "v" }, new[] { "o" })
            .ToModel();
        ort = new InferenceSession(model, MatMulBench.OrtThreads());
        ortIn = new[] { qs, ks, vs }.Select(a => OrtValue.CreateTensorValueFromMemory(ToBhtd(a), new long[] { B, H, T, D })).ToArray();
        ortOut = OrtValue.CreateTensorValueFromMemory(new float[qs.Length], new long[] { B, H, T, D });
        runOptions = new RunOptions();
        OnnxRuntime();
        var ortO = ortOut.GetTensorDataAsSpan<float>().ToArray();
        Validate.Sampled("onnxruntime attention", ortO, i => expected[BthdIndex(i)], 1e-4);

        naiveOut = new float[qs.Length];
        NaiveLoop();
        Validate.Sampled("naive attention", naiveOut, i => expected[i], 1e-4);
    }

    private (Tensor, Tensor, Tensor, Tensor, Tensor) Upload(Device d) => (
        d.FromArray("q", qs, B, T, H, D), d.FromArray("k", ks, B, T, H, D), d.FromArray("v", vs, B, T, H, D),
        d.Zeros("o", B, T, H, D), d.Zeros("lse", B, T, H));

    private static float[] ToBhtd(float[] bthd)
    {
        var r = new float[bthd.Length];
        for (int i = 0; i < r.Length; i++) r[i] = bthd[BthdIndex(i)];
        return r;
    }

    /// <summary>Index in (B, T, H, D) of element i of (B, H, T, D).</summary>
    private static int BthdIndex(int i)
    {
        int d = i % D, t = i / D % T, h = i / (D * T) % H, b = i / (D * T * H);
        return ((b * T + t) * H + h) * D + d;
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var x in new IDisposable?[] { q, k, v, o, lse, cq, ck, cv, co, cl, ortOut, runOptions, ort, opencl, cpu }) x?.Dispose();
        foreach (var x in ortIn) x.Dispose();
    }

    [Benchmark(Baseline = true, Description = "CPU backend")]
    public void CpuBackend() => cpu.Ops.Attention(q, k, v, o, lse, causal: true);

    [Benchmark(Description = "ONNX Runtime")]
    public void OnnxRuntime() => ort.Run(runOptions, new[] { "q", "k", "v" }, ortIn, new[] { "o" }, new[] { ortOut });

    [Benchmark(Description = "OpenCL (PoCL)")]
    public void OpenClPoCL()
    {
        if (opencl == null) throw new InvalidOperationException("OpenCL not available");
        opencl.Ops.Attention(cq!, ck!, cv!, co!, cl!, causal: true);
        opencl.Synchronize();
    }

    /// <summary>Per head: the full T x T score matrix, masked softmax, then P V; plain loops, one thread.</summary>
    [Benchmark(Description = "naive C# loop")]
    public void NaiveLoop()
    {
        var scores = new float[T * T];
        for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
        {
            for (int i = 0; i < T; i++)
            {
                float max = float.NegativeInfinity;
                for (int j = 0; j < T; j++)
                {
                    float s = float.NegativeInfinity;
                    if (j <= i)
                    {
                        s = 0;
                        for (int d = 0; d < D; d++) s += qs[((b * T + i) * H + h) * D + d] * ks[((b * T + j) * H + h) * D + d];
                        s *= Shape.Scale;
                    }

                    scores[i * T + j] = s;
                    max = Math.Max(max, s);
                }

                float sum = 0;
                for (int j = 0; j < T; j++) sum += scores[i * T + j] = MathF.Exp(scores[i * T + j] - max);
                for (int d = 0; d < D; d++)
                {
                    float acc = 0;
                    for (int j = 0; j < T; j++) acc += scores[i * T + j] * vs[((b * T + j) * H + h) * D + d];
                    naiveOut[((b * T + i) * H + h) * D + d] = acc / sum;
                }
            }
        }
    }

    private sealed class Config : BenchConfig
    {
        public Config()
        {
            const double flops = 2.0 * B * H * T * T * D;
            AddColumn(RateColumn.Flops(_ => flops, false));
            AddColumn(RateColumn.Flops(_ => flops, true));
        }
    }
}
