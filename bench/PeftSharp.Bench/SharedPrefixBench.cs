using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using Microsoft.ML.OnnxRuntime;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Bench;

/// <summary>
/// Decode-step attention behind a shared prefix: B sequences share a P-token prefix and each has 16 cached tokens of
/// its own; one new query token each. H = 8, Hkv = 2, D = 64 (the H = 32, Hkv = 8, D = 128 scaled to fit this
/// CPU; the same 4:1 grouping). Shared: the prefix keys and values held once, all B queries against them in one
/// pass, each sequence's suffix on its own, merged by log-sum-exp. Against attention over a per-sequence copy of
/// prefix + suffix (our kernel), and ONNX Runtime's plain attention graph over the same copies (GQA as
/// (B, Hkv, H/Hkv, D) queries against (B, Hkv, Tk, D) keys, no head repeats). Checked against each other in setup.
/// </summary>
[Config(typeof(BenchConfig))]
public class SharedPrefixBench
{
    private const int H = 8, Hkv = 2, D = 64, Suffix = 16;
    private Device cpu = null!;
    private Tensor q = null!, prefixK = null!, prefixV = null!, suffixK = null!, suffixV = null!, o = null!, lse = null!;
    private Tensor copyK = null!, copyV = null!, copyO = null!, copyL = null!;
    private PrefixLevel[] levels = null!;
    private InferenceSession ort = null!;
    private OrtValue[] ortIn = null!;
    private OrtValue ortOut = null!;
    private RunOptions runOptions = null!;

    [Params(1, 8, 64)]
    public int Batch { get; set; }

    [Params(1024, 4096, 16384)]
    public int Prefix { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        cpu = new CpuDevice();
        int b = Batch, p = Prefix, tk = p + Suffix, row = Hkv * D;
        var qs = Validate.Uniform(b * H * D, 1);
        var pk = Validate.Uniform(p * row, 2);
        var pv = Validate.Uniform(p * row, 3);
        var sk = Validate.Uniform(b * Suffix * row, 4);
        var sv = Validate.Uniform(b * Suffix * row, 5);
        q = cpu.FromArray("q", qs, b, 1, H, D);
        prefixK = cpu.FromArray("prefix_k", pk, 1, p, Hkv, D);
        prefixV = cpu.FromArray("prefix_v", pv, 1, p, Hkv, D);
        suffixK = cpu.FromArray("suffix_k", sk, b, Suffix, Hkv, D);
        suffixV = cpu.FromArray("suffix_v", sv, b, Suffix, Hkv, D);
        o = cpu.Zeros("o", b, 1, H, D);
        lse = cpu.Zeros("lse", b, 1, H);
        levels = new[] { new PrefixLevel(prefixK, prefixV, new int[b]) };

        // The copies: every sequence's own [prefix, suffix].
        var ck = new float[b * tk * row];
        var cv = new float[b * tk * row];
        for (int j = 0; j < b; j++)
        {
            Array.Copy(pk, 0, ck, j * tk * row, p * row);
            Array.Copy(pv, 0, cv, j * tk * row, p * row);
            Array.Copy(sk, j * Suffix * row, ck, (j * tk + p) * row, Suffix * row);
            Array.Copy(sv, j * Suffix * row, cv, (j * tk + p) * row, Suffix * row);
        }

        copyK = cpu.FromArray("copy_k", ck, b, tk, Hkv, D);
        copyV = cpu.FromArray("copy_v", cv, b, tk, Hkv, D);
        copyO = cpu.Zeros("copy_o", b, 1, H, D);
        copyL = cpu.Zeros("copy_lse", b, 1, H);
        PerSequenceCopy();
        var reference = copyO.ToArray();
        Shared();
        Validate.Sampled("shared-prefix attention vs per-sequence copies", o.ToArray(), i => reference[i], 1e-4);

        // ONNX Runtime: q (B, Hkv, G, D), k and v (B, Hkv, Tk, D), transposed here outside the timing.
        int g = H / Hkv;
        var model = new OnnxGraph()
            .Input("q", b, Hkv, g, D).Input("k", b, Hkv, tk, D).Input("v", b, Hkv, tk, D).Output("o", b, Hkv, g, D)
            .Constant("scale", new[] { (float)(1 / Math.Sqrt(D)) })
            .Node("Transpose", new[] { "k" }, new[] { "kt" }, "", ("perm", new long[] { 0, 1, 3, 2 }))
            .Node("MatMul", new[] { "q", "kt" }, new[] { "s" })
            .Node("Mul", new[] { "s", "scale" }, new[] { "ss" })
            .Node("Softmax", new[] { "ss" }, new[] { "p" }, "", ("axis", -1))
            .Node("MatMul", new[] { "p", "v" }, new[] { "o" })
            .ToModel();
        ort = new InferenceSession(model, MatMulBench.OrtThreads());
        float[] HeadsFirst(float[] a, int t)
        {
            var r = new float[a.Length];
            for (int j = 0; j < b; j++)
            for (int i = 0; i < t; i++)
            for (int hk = 0; hk < Hkv; hk++)
                Array.Copy(a, ((j * t + i) * Hkv + hk) * D, r, ((j * Hkv + hk) * t + i) * D, D);
            return r;
        }

        ortIn = new[]
        {
            OrtValue.CreateTensorValueFromMemory(qs, new long[] { b, Hkv, g, D }), // (B, 1, H, D) is already (B, Hkv, G, D)
            OrtValue.CreateTensorValueFromMemory(HeadsFirst(ck, tk), new long[] { b, Hkv, tk, D }),
            OrtValue.CreateTensorValueFromMemory(HeadsFirst(cv, tk), new long[] { b, Hkv, tk, D }),
        };
        ortOut = OrtValue.CreateTensorValueFromMemory(new float[b * H * D], new long[] { b, Hkv, g, D });
        runOptions = new RunOptions();
        OnnxRuntimeCopies();
        Validate.Sampled("onnxruntime attention over copies", ortOut.GetTensorDataAsSpan<float>().ToArray(), i => reference[i], 1e-4);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var x in new IDisposable[] { q, prefixK, prefixV, suffixK, suffixV, o, lse, copyK, copyV, copyO, copyL, ortOut, runOptions, ort, cpu }) x.Dispose();
        foreach (var x in ortIn) x.Dispose();
    }

    [Benchmark(Baseline = true, Description = "shared prefix (one copy)")]
    public void Shared() => cpu.Ops.SharedPrefixAttention(q, levels, suffixK, suffixV, o, lse);

    [Benchmark(Description = "per-sequence copy")]
    public void PerSequenceCopy() => cpu.Ops.Attention(q, copyK, copyV, copyO, copyL, causal: true);

    [Benchmark(Description = "ONNX Runtime, copies")]
    public void OnnxRuntimeCopies() => ort.Run(runOptions, new[] { "q", "k", "v" }, ortIn, new[] { "o" }, new[] { ortOut });
}

/// <summary>
/// Training attention for one 1,024-token prompt with G = 8 completions of 128 tokens (H = 8, Hkv = 2, D = 64),
/// forward and backward: the prompt's keys and values once, shared by the completions (Prefix Grouper), against the
/// batch with the prompt copied into each of the 8 rows. Memory: the device's peak bytes of live tensors during one
/// call (<see cref="Device.PeakBytesInUse"/>), measured once in setup: inputs, outputs, gradients and every
/// intermediate the attention allocates.
/// </summary>
[Config(typeof(Config))]
public class GroupedAttentionBench
{
    private static readonly Dictionary<string, long> PeakBytes = new();

    private const int H = 8, Hkv = 2, D = 64, Prompt = 1024, G = 8, C = 128;
    private Device device = null!;

    /// <summary>The device setup opened (BenchDevice), for callers that time the methods themselves.</summary>
    internal Device Device => device;
    private float[] qp = null!, kp = null!, vp = null!, qc = null!, kc = null!, vc = null!, dOp = null!, dOc = null!;

    [GlobalSetup]
    public void Setup()
    {
        device = BenchDevice.Open();
        qp = Validate.Uniform(Prompt * H * D, 1);
        kp = Validate.Uniform(Prompt * Hkv * D, 2);
        vp = Validate.Uniform(Prompt * Hkv * D, 3);
        qc = Validate.Uniform(G * C * H * D, 4);
        kc = Validate.Uniform(G * C * Hkv * D, 5);
        vc = Validate.Uniform(G * C * Hkv * D, 6);
        dOp = Validate.Uniform(Prompt * H * D, 7);
        dOc = Validate.Uniform(G * C * H * D, 8);
        var shared = Measure(nameof(Grouped), Grouped);
        var copied = Measure(nameof(Copied), Copied);
        Validate.Sampled("grouped vs copied completion outputs", shared, i => copied[i], 1e-4);
    }

    private float[] Measure(string method, Func<float[]> run)
    {
        long before = device.BytesInUse;
        device.ResetPeakBytes();
        var result = run();
        PeakBytes[method] = device.PeakBytesInUse - before;
        return result;
    }

    private sealed class Config : BenchConfig
    {
        public Config() => AddColumn(new PeakMemoryColumn());
    }

    private sealed class PeakMemoryColumn() : CustomColumn(
        "PeakTensorMemory", "most bytes of live tensors on the device during one call (inputs, outputs, gradients, intermediates)", unit: UnitType.Size)
    {
        public override string ColumnName => "peak tensor memory";

        public override string GetValue(Summary summary, BenchmarkCase benchmarkCase) =>
            PeakBytes.TryGetValue(benchmarkCase.Descriptor.WorkloadMethod.Name, out long b) ? $"{b / 1e6:F1} MB" : "-";
    }

    [GlobalCleanup]
    public void Cleanup() => device.Dispose();

    /// <summary>Prompt rows causal once; completions against [prompt, own] through the shared-prefix path; both backward.</summary>
    [Benchmark(Baseline = true, Description = "prompt once, shared (Prefix Grouper)")]
    public float[] Grouped()
    {
        var ops = device.Ops;
        using var q1 = device.FromArray("qp", qp, 1, Prompt, H, D);
        using var k1 = device.FromArray("kp", kp, 1, Prompt, Hkv, D);
        using var v1 = device.FromArray("vp", vp, 1, Prompt, Hkv, D);
        using var q2 = device.FromArray("qc", qc, G, C, H, D);
        using var k2 = device.FromArray("kc", kc, G, C, Hkv, D);
        using var v2 = device.FromArray("vc", vc, G, C, Hkv, D);
        using var o1 = device.Zeros("op", 1, Prompt, H, D);
        using var l1 = device.Zeros("lp", 1, Prompt, H);
        using var o2 = device.Zeros("oc", G, C, H, D);
        using var l2 = device.Zeros("lc", G, C, H);
        var level = new[] { new PrefixLevel(k1, v1, new int[G]) };
        ops.Attention(q1, k1, v1, o1, l1, causal: true);
        ops.SharedPrefixAttention(q2, level, k2, v2, o2, l2);
        using var d1 = device.FromArray("dop", dOp, 1, Prompt, H, D);
        using var d2 = device.FromArray("doc", dOc, G, C, H, D);
        using var dq1 = device.Zeros("dqp", 1, Prompt, H, D);
        using var dk1 = device.Zeros("dkp", 1, Prompt, Hkv, D);
        using var dv1 = device.Zeros("dvp", 1, Prompt, Hkv, D);
        using var dkShared = device.Zeros("dk_shared", 1, Prompt, Hkv, D);
        using var dvShared = device.Zeros("dv_shared", 1, Prompt, Hkv, D);
        using var dq2 = device.Zeros("dqc", G, C, H, D);
        using var dk2 = device.Zeros("dkc", G, C, Hkv, D);
        using var dv2 = device.Zeros("dvc", G, C, Hkv, D);
        ops.SharedPrefixAttentionBackward(q2, level, k2, v2, o2, l2, d2, dq2, new[] { dkShared }, new[] { dvShared }, dk2, dv2);
        ops.AttentionBackward(q1, k1, v1, o1, l1, d1, dq1, dk1, dv1, causal: true);
        ops.Add(dk1, dkShared, dk1);
        ops.Add(dv1, dvShared, dv1);
        return o2.ToArray();
    }

    /// <summary>G rows of [prompt, completion] (1,152 tokens each), causal, forward and backward.</summary>
    [Benchmark(Description = "prompt copied per completion")]
    public float[] Copied()
    {
        var ops = device.Ops;
        int t = Prompt + C;
        float[] Rows(float[] prompt, float[] own, int width)
        {
            var r = new float[G * t * width];
            for (int g = 0; g < G; g++)
            {
                Array.Copy(prompt, 0, r, g * t * width, Prompt * width);
                Array.Copy(own, g * C * width, r, (g * t + Prompt) * width, C * width);
            }

            return r;
        }

        using var q = device.FromArray("q", Rows(qp, qc, H * D), G, t, H, D);
        using var k = device.FromArray("k", Rows(kp, kc, Hkv * D), G, t, Hkv, D);
        using var v = device.FromArray("v", Rows(vp, vc, Hkv * D), G, t, Hkv, D);
        using var o = device.Zeros("o", G, t, H, D);
        using var l = device.Zeros("l", G, t, H);
        ops.Attention(q, k, v, o, l, causal: true);
        using var dO = device.FromArray("do", Rows(dOp, dOc, H * D), G, t, H, D);
        using var dq = device.Zeros("dq", G, t, H, D);
        using var dk = device.Zeros("dk", G, t, Hkv, D);
        using var dv = device.Zeros("dv", G, t, Hkv, D);
        ops.AttentionBackward(q, k, v, o, l, dO, dq, dk, dv, causal: true);
        var all = o.ToArray();
        var completions = new float[G * C * H * D];
        for (int g = 0; g < G; g++) Array.Copy(all, (g * t + Prompt) * H * D, completions, g * C * H * D, C * H * D);
        return completions;
    }
}
