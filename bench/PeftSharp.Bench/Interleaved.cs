using System.Diagnostics;

namespace PeftSharp.Bench;

/// <summary>
/// The model forward against ONNX Runtime's, alternated call by call in one process: round i times one PeftSharp
/// forward and one ONNX Runtime forward back to back (which goes first alternates), so a host that slows down for a
/// while slows both. Prints the medians, the median of the per-round ratios and its spread. BenchmarkDotNet runs each
/// method's iterations as one block, and on this shared VM a block can land in a slow minute (ONNX Runtime's error
/// bands were 15-80 ms on a 250 ms forward in three runs of 2026-12-04), so the ratio is read from here.
/// Same setup as <see cref="ModelBench"/> (its weights, tokens and validated ONNX graph).
/// </summary>
internal static class Interleaved
{
    public static void Run(string[] args)
    {
        string size = args.Length > 0 ? args[0] : "20M";
        int rounds = args.Length > 1 ? int.Parse(args[1]) : 40;
        // A pause before each timed call: ONNX Runtime's intra-op threads spin after a run and PeftSharp's workers for
        // 1 ms after each loop, so a call that starts right after the other library's would share the cores with them.
        int pauseMs = args.Length > 2 ? int.Parse(args[2]) : 50;
        var bench = new ModelBench { Size = size };
        bench.Setup();
        try
        {
            // Warm-up: at least 3 s and 10 calls each. Until .NET's tiered JIT has recompiled the hot loops, the tiny
            // model's forward took 2-3x its warm time (first 100 calls averaged 6.6-8.8 ms, then 2.5-2.9 ms).
            long warmUntil = Stopwatch.GetTimestamp() + 3 * Stopwatch.Frequency;
            for (int i = 0; i < 10 || Stopwatch.GetTimestamp() < warmUntil; i++)
            {
                bench.Forward();
                bench.OnnxRuntimeForward();
            }

            var ours = new double[rounds];
            var theirs = new double[rounds];
            for (int i = 0; i < rounds; i++)
            {
                if (i % 2 == 0)
                {
                    ours[i] = Time(pauseMs, () => bench.Forward());
                    theirs[i] = Time(pauseMs, bench.OnnxRuntimeForward);
                }
                else
                {
                    theirs[i] = Time(pauseMs, bench.OnnxRuntimeForward);
                    ours[i] = Time(pauseMs, () => bench.Forward());
                }
            }

            var ratios = Enumerable.Range(0, rounds).Select(i => theirs[i] / ours[i]).ToArray();
            Console.WriteLine($"// {size}, {rounds} rounds, B = {ModelBench.Batch} x T = {ModelBench.SeqLen}");
            Console.WriteLine($"PeftSharp forward    median {Median(ours):F2} ms  (min {ours.Min():F2})");
            Console.WriteLine($"ONNX Runtime forward median {Median(theirs):F2} ms  (min {theirs.Min():F2})");
            Console.WriteLine($"throughput ours / ORT: median of rounds {Median(ratios):F3}, quartiles {Quantile(ratios, 0.25):F3} .. {Quantile(ratios, 0.75):F3}; rounds where ours was " +
                $"faster: {ratios.Count(r => r > 1)}/{rounds}");
        }
        finally
        {
            bench.Cleanup();
        }
    }

    private static double Time(int pauseMs, Action a)
    {
        Thread.Sleep(pauseMs);
        long t0 = Stopwatch.GetTimestamp();
        a();
        return Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
    }

    private static double Median(double[] xs) => Quantile(xs, 0.5);

    private static double Quantile(double[] xs, double q)
    {
        var s = xs.OrderBy(x => x).ToArray();
        double pos = q * (s.Length - 1);
        int lo = (int)pos;
        return lo + 1 < s.Length ? s[lo] + (pos - lo) * (s[lo + 1] - s[lo]) : s[lo];
    }
}
