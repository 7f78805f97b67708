using System.Diagnostics;
using Microsoft.ML.OnnxRuntime;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- gemm [rounds]: y = x W^T on the MatMulBench shapes, the
/// CPU backend's rounds, then ONNX Runtime's, in one process (medians), with the ISA that ran and the
/// fraction of the measured FMA peak. A quick tuning loop beside the BenchmarkDotNet run, not a replacement for it.
/// </summary>
internal static class GemmProbe
{
    public static void Run(string[] args)
    {
        if (args.Length > 0 && args[0] == "kernel")
        {
            Kernel(int.Parse(args[1]));
            return;
        }

        if (args.Length > 0 && args[0] == "raw")
        {
            Raw(args[1..]);
            return;
        }

        int rounds = args.Length > 0 ? int.Parse(args[0], System.Globalization.CultureInfo.InvariantCulture) : 7;
        Console.WriteLine($"// ISA: {(System.Runtime.Intrinsics.X86.Avx512F.IsSupported ? "AVX-512" : System.Runtime.Intrinsics.X86.Avx2.IsSupported ? "AVX2" : "other")}, " +
            $"{Environment.ProcessorCount} threads, peak {PeakProbe.GFlops:F1} GFLOP/s");
        using var cpu = new CpuDevice();
        foreach (var s in MatMulBench.Cases())
        {
            var xs = Validate.Uniform(s.M * s.K, 1);
            var ws = Validate.Uniform(s.N * s.K, 2);
            using var x = cpu.FromArray("x", xs, s.M, s.K);
            using var w = cpu.FromArray("w", ws, s.N, s.K);
            using var y = cpu.Zeros("y", s.M, s.N);
            var wt = new float[s.K * s.N];
            for (int n = 0; n < s.N; n++)
            for (int k = 0; k < s.K; k++)
                wt[k * s.N + n] = ws[n * s.K + k];
            var model = new OnnxGraph().Input("x", s.M, s.K).Constant("wt", wt, s.K, s.N).Output("y", s.M, s.N).Node("MatMul", new[] { "x", "wt" }, new[] { "y" }).ToModel();
            using var ort = new InferenceSession(model, MatMulBench.OrtThreads());
            using var ortIn = OrtValue.CreateTensorValueFromMemory(xs, new long[] { s.M, s.K });
            using var ortOut = OrtValue.CreateTensorValueFromMemory(new float[s.M * s.N], new long[] { s.M, s.N });
            using var ro = new RunOptions();
            int reps = Math.Max(1, (int)(2e9 / s.Flops));
            double Time(Action a)
            {
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < reps; i++) a();
                return sw.Elapsed.TotalMilliseconds / reps;
            }

            void Ours() => cpu.Ops.Linear(x, w, y);
            void Theirs() => ort.Run(ro, new[] { "x" }, new[] { ortIn }, new[] { "y" }, new[] { ortOut });
            Ours();
            Theirs();
            // Ours first, then ONNX Runtime's: its thread pool spins after each run (its default), which on 2 cores
            // took the CPU from our threads when the two were interleaved (1024^3 measured 31 ms that way, 15 ms alone).
            var ours = new List<double>();
            var theirs = new List<double>();
            Thread.Sleep(200);
            for (int r = 0; r < rounds; r++) ours.Add(Time(Ours));
            for (int r = 0; r < rounds; r++) theirs.Add(Time(Theirs));

            double mo = Median(ours), mt = Median(theirs);
            Console.WriteLine($"{s,-22} CPU backend {mo,8:F3} ms ({s.Flops / mo / 1e6,6:F1} GFLOP/s, {s.Flops / mo / 1e6 / PeakProbe.GFlops,4:P0} of peak)   ONNX Runtime {mt,8:F3} ms   " +
                $"ratio {mt / mo:F2}x");
        }
    }

    /// <summary>gemm raw M N K [threads 1|2] [transB 0|1]: Gemm.Sgemm alone (no tensor layer), for kernel tuning.</summary>
    private static unsafe void Raw(string[] args)
    {
        int m = int.Parse(args[0]), n = int.Parse(args[1]), k = int.Parse(args[2]);
        bool parallel = args.Length <= 3 || args[3] != "1";
        bool transB = args.Length <= 4 || args[4] != "0";
        var a = Validate.Uniform(m * k, 1);
        var b = Validate.Uniform(n * k, 2);
        var c = new float[m * n];
        double flops = 2.0 * m * n * k;
        int reps = Math.Max(1, (int)(4e9 / flops));
        fixed (float* ap = a, bp = b, cp = c)
        {
            float* pa = ap, pb = bp, pc = cp;
            void Once() => Gemm.Sgemm(false, transB, m, n, k, 1f, pa, k, pb, transB ? k : n, 0f, pc, n, parallel);
            Once();
            var times = new List<double>();
            for (int r = 0; r < 7; r++)
            {
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < reps; i++) Once();
                times.Add(sw.Elapsed.TotalMilliseconds / reps);
            }

            double t = Median(times);
            Console.WriteLine($"M{m} N{n} K{k} {(parallel ? "parallel" : "1 thread")} transB={transB}: {t:F3} ms, {flops / t / 1e6:F1} GFLOP/s");
        }
    }

    /// <summary>gemm kernel KC: the AVX2 6 x 16 micro-kernel alone over L1/L2-resident packed panels, one thread.</summary>
    private static unsafe void Kernel(int kc)
    {
        const int aPanels = 16, bPanels = 16;
        var a = Validate.Uniform(aPanels * Gemm.MR * kc, 1);
        var b = Validate.Uniform(bPanels * Gemm.NR * kc, 2);
        var tile = new float[Gemm.MR * Gemm.NR];
        fixed (float* ap = a, bp = b, tp = tile)
        {
            for (int round = 0; round < 5; round++)
            {
                var sw = Stopwatch.StartNew();
                long calls = 0;
                while (sw.ElapsedMilliseconds < 500)
                {
                    for (int j = 0; j < bPanels; j++)
                    {
                        for (int i = 0; i < aPanels; i++) Gemm.Kernel6x16Loop(kc, ap + i * Gemm.MR * kc, 1, Gemm.MR, bp + j * Gemm.NR * kc, Gemm.MR, tp);
                    }

                    calls += aPanels * bPanels;
                }

                double flops = 2.0 * Gemm.MR * Gemm.NR * kc * calls;
                Console.WriteLine($"kernel 6x16, KC {kc}: {flops / sw.Elapsed.TotalSeconds / 1e9:F1} GFLOP/s on one thread");
            }
        }
    }

    private static double Median(List<double> v)
    {
        var s = v.OrderBy(x => x).ToList();
        return s[s.Count / 2];
    }
}
