using System.Diagnostics;
using PeftSharp.Engine;

namespace PeftSharp.Bench;

/// <summary>
/// The issues' performance targets in one short run on one device, for a GPU machine lent for a few minutes (no time
/// for BenchmarkDotNet's full suites there) and for a quick look here:
///   PEFTSHARP_BENCH_DEVICE=cuda dotnet run --project bench/PeftSharp.Bench -c Release -- targets [--small]
/// Each case is set up and checked against its reference first (the LoRA and 1-bit cases through the benchmark classes'
/// own setups, which compare with double computations), then timed: warm-up calls (30, or 1 s, at least 3), then calls
/// until 0.5 s or 30 calls (at least 5), each ended by Synchronize, so a GPU's queued kernels count. Medians; each target's line says
/// met or not. Decode attention runs the shape (H = 32, Hkv = 8, D = 128, 16 cached tokens of each sequence's
/// own) unless --small, which uses the CPU benchmark's H = 8, Hkv = 2, D = 64 and only the 2048 hidden size elsewhere.
/// </summary>
internal static class Targets
{
    public static void Run(string[] args)
    {
        bool small = args.Contains("--small");
        using (var probe = BenchDevice.Open()) Console.WriteLine($"// device {BenchDevice.Spec}: {probe.Info.Name}");
        SharedPrefixDecode(small);
        Lora();
        BitDelta(small);
        GroupedTraining();
    }

    /// <summary>Issue 5: decode attention for 64 sequences behind one prefix, shared against a copy per sequence.</summary>
    private static void SharedPrefixDecode(bool small)
    {
        int h = small ? 8 : 32, hkv = small ? 2 : 8, d = small ? 64 : 128;
        const int b = 64, suffix = 16;
        Console.WriteLine($"\nissue 5: decode attention, B = {b}, H = {h}, Hkv = {hkv}, D = {d}, {suffix} own cached tokens per sequence");
        var shared = new Dictionary<int, double>();
        foreach (int p in new[] { 1024, 4096, 16384 })
        {
            using var device = BenchDevice.Open();
            int row = hkv * d, tk = p + suffix;
            var qs = Validate.Uniform(b * h * d, 1);
            var pk = Validate.Uniform(p * row, 2);
            var pv = Validate.Uniform(p * row, 3);
            var sk = Validate.Uniform(b * suffix * row, 4);
            var sv = Validate.Uniform(b * suffix * row, 5);
            using var q = device.FromArray("q", qs, b, 1, h, d);
            using var prefixK = device.FromArray("prefix_k", pk, 1, p, hkv, d);
            using var prefixV = device.FromArray("prefix_v", pv, 1, p, hkv, d);
            using var suffixK = device.FromArray("suffix_k", sk, b, suffix, hkv, d);
            using var suffixV = device.FromArray("suffix_v", sv, b, suffix, hkv, d);
            using var o = device.Zeros("o", b, 1, h, d);
            using var lse = device.Zeros("lse", b, 1, h);
            var levels = new[] { new PrefixLevel(prefixK, prefixV, new int[b]) };

            // Each sequence's own [prefix, suffix], built on the device from the same tensors.
            using var copyK = device.Zeros("copy_k", b, tk, hkv, d);
            using var copyV = device.Zeros("copy_v", b, tk, hkv, d);
            for (int j = 0; j < b; j++)
            {
                device.Ops.Copy(prefixK, copyK.View(j * tk * row, 1, p, hkv, d));
                device.Ops.Copy(prefixV, copyV.View(j * tk * row, 1, p, hkv, d));
                device.Ops.Copy(suffixK.View(j * suffix * row, 1, suffix, hkv, d), copyK.View((j * tk + p) * row, 1, suffix, hkv, d));
                device.Ops.Copy(suffixV.View(j * suffix * row, 1, suffix, hkv, d), copyV.View((j * tk + p) * row, 1, suffix, hkv, d));
            }

            using var copyO = device.Zeros("copy_o", b, 1, h, d);
            using var copyL = device.Zeros("copy_lse", b, 1, h);
            void Shared() => device.Ops.SharedPrefixAttention(q, levels, suffixK, suffixV, o, lse);
            void Copied() => device.Ops.Attention(q, copyK, copyV, copyO, copyL, causal: true);
            Shared();
            Copied();
            var reference = copyO.ToArray();
            Validate.Sampled($"shared prefix vs copies, P = {p}", o.ToArray(), i => reference[i], 1e-4);
            double ts = Time(device, Shared), tc = Time(device, Copied);
            shared[p] = ts;
            Console.WriteLine($"  P = {p,5}: shared {Ms(ts)}, per-sequence copy {Ms(tc)}: {tc / ts:F2}x; prefix KV {4.0 * 2 * p * row / 1e6:F0} MB once against " +
                $"{4.0 * 2 * b * tk * row / 1e6:F0} MB copied");
            if (p == 4096) Console.WriteLine($"  target: at least 10x the per-sequence path at P = 4K: {Verdict(tc / ts >= 10)} ({tc / ts:F2}x)");
        }

        // Every step decodes B tokens whatever P is, so throughput goes as 1 / time.
        double loss = 1 - shared[1024] / shared[16384];
        Console.WriteLine($"  target: under 15% throughput loss from P = 1K to 16K: {Verdict(loss < 0.15)} ({loss:P0}; the shared step takes {shared[16384] / shared[1024]:F2}x as long)");
    }

    /// <summary>Issue 4: 32 requests over a 2048 x 2048 layer, 1 / 8 / 32 adapters of rank 8 / 16 / 64.</summary>
    private static void Lora()
    {
        Console.WriteLine("\nissue 4: LoRA mixed batch, 32 requests, hidden 2048");
        foreach (int adapters in new[] { 1, 8, 32 })
        foreach (int rank in new[] { 8, 16, 64 })
        {
            if (adapters < 32 && rank != 16) continue; // the targets: rank 16 against the base; 32 adapters against (a)
            var bench = new LoraBench { Adapters = adapters, Rank = rank };
            bench.Setup();
            try
            {
                var device = bench.Device;
                double tb = Time(device, bench.BaseOnly), tm = Time(device, bench.Mixed), ta = Time(device, bench.PerAdapterBatches);
                string line = $"  {adapters,2} adapters, rank {rank,2}: base {Ms(tb)}, mixed {Ms(tm)} ({tm / tb:F2}x base), (a) per-adapter batches {Ms(ta)} ({ta / tm:F2}x mixed)";
                if (rank == 16) line += $"; target mixed <= 1.25x base: {Verdict(tm / tb <= 1.25)}";
                if (adapters == 32) line += $"; target (a) >= 4x mixed: {Verdict(ta / tm >= 4)}";
                Console.WriteLine(line);
            }
            finally
            {
                bench.Cleanup();
            }
        }
    }

    /// <summary>Issue 6: a decode step over one layer for rows from several 1-bit variants.</summary>
    private static void BitDelta(bool small)
    {
        Console.WriteLine("\nissue 6: 1-bit deltas, fused against (a) a dense fp32 weight per variant");
        foreach (int hidden in small ? new[] { 2048 } : new[] { 2048, 4096 })
        foreach (string batch in new[] { "8x8", "32x8", "32x32" })
        {
            var bench = new BitDeltaBench { Batch = batch, Hidden = hidden };
            bench.Setup();
            try
            {
                var device = bench.Device;
                double tb = Time(device, bench.BaseOnly), tf = Time(device, bench.Fused), ta = Time(device, bench.DensePerVariant);
                Console.WriteLine($"  {batch,5} rows x variants, hidden {hidden}: base {Ms(tb)}, fused {Ms(tf)}, (a) {Ms(ta)}: {ta / tf:F2}x; target >= 3x: {Verdict(ta / tf >= 3)}");
            }
            finally
            {
                bench.Cleanup();
            }
        }
    }

    /// <summary>Issue 5: attention forward and backward for a 1K prompt with 8 completions of 128 tokens.</summary>
    private static void GroupedTraining()
    {
        Console.WriteLine("\nissue 5: training attention, 1,024-token prompt, G = 8 completions of 128 tokens");
        var bench = new GroupedAttentionBench();
        bench.Setup();
        try
        {
            var device = bench.Device;
            double tg = Time(device, () => bench.Grouped()), tc = Time(device, () => bench.Copied());
            Console.WriteLine($"  prompt once {Ms(tg)}, prompt copied {Ms(tc)}: {tc / tg:F2}x; target >= 3x: {Verdict(tc / tg >= 3)} (3.24x is the score-pair bound)");
        }
        finally
        {
            bench.Cleanup();
        }
    }

    /// <summary>Median milliseconds of one call, each call ended by Synchronize.</summary>
    private static double Time(Device device, Action run)
    {
        // Warm-up: 30 calls or 1 s (at least 3): until .NET's tiered JIT has recompiled the host-side loops, a case's
        // first calls ran up to 2x slower here (the copied-prompt attention 516 ms after 3 calls against 270 ms warm).
        var warm = Stopwatch.StartNew();
        for (int i = 0; i < 3 || (i < 30 && warm.Elapsed.TotalSeconds < 1); i++) run();
        device.Synchronize();
        var times = new List<double>();
        var total = Stopwatch.StartNew();
        while (times.Count < 5 || (times.Count < 30 && total.Elapsed.TotalSeconds < 0.5))
        {
            long t0 = Stopwatch.GetTimestamp();
            run();
            device.Synchronize();
            times.Add(Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
        }

        times.Sort();
        return times[times.Count / 2];
    }

    private static string Ms(double ms) => ms >= 10 ? $"{ms:F1} ms" : $"{ms:F3} ms";

    private static string Verdict(bool met) => met ? "met" : "NOT met";
}
