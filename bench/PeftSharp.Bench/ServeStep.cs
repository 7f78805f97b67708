using System.Diagnostics;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;
using PeftSharp.Serving;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serve-step [tiny|20M] [rows] [seconds] [only: a word of one step's name]
/// What one scheduler step costs on the serve-load model: a decode step of R single-token rows (each over a 64-position
/// cache), on the base alone and over 8 LoRA adapters (rows spread over them), against one row; and a 50-token prefill
/// alone and beside R - 1 decoding rows. The time a joining request waits for its first token is about these steps.
/// Then one sampled token over a 128K vocabulary (see <see cref="Draws"/>).
/// </summary>
internal static class ServeStep
{
    public static void Run(string[] args)
    {
        string size = args.Length > 0 ? args[0] : "20M";
        int rows = args.Length > 1 ? int.Parse(args[1]) : 16;
        double seconds = args.Length > 2 ? double.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 2;
        using var device = new CpuDevice();
        var config = ModelBench.ConfigFor(size);
        using var model = LlamaModel.Create(device, config, seed: 3);
        using var set = new VariantSet(model);
        for (int i = 0; i < 8; i++) set.AddLora("lora" + i, ServeLoad.RandomLora(config, 8, 100 + i));
        var rng = new Random(1);
        int[] Tokens(int n) => Enumerable.Range(0, n).Select(_ => rng.Next(256)).ToArray();
        var caches = Enumerable.Range(0, rows).Select(_ => new KvCache(model, 64)).ToList();
        foreach (var c in caches) model.DecodeBatch(new[] { c }, new[] { Tokens(64) });
        long flopsPerToken = 2 * model.ParameterCount;
        Console.WriteLine($"// {size} model, {rows} rows, {Environment.ProcessorCount} threads, {device.Info.Detail}");

        string? only = args.Length > 3 ? args[3] : null; // a word of the one step to time (for a profiler)
        var cases = new List<(string What, Func<int> Step)>();
        void Time(string what, Func<int> step)
        {
            if (only == null || what.Contains(only, StringComparison.Ordinal)) cases.Add((what, step));
        }

        int Decode(int count, bool variants)
        {
            // Each step writes position 64 into a one-position cache over the row's 64 cached positions, so every step attends over the same length.
            // Rows of one adapter side by side, as the scheduler orders a step's sequences.
            using var bound = variants ? set.Bind(Enumerable.Range(0, count).Select(i => i * 8 / count).ToArray()) : null;
            var next = caches.Take(count).Select(c => new KvCache(model, 1, c)).ToArray();
            model.DecodeBatch(next, Enumerable.Range(0, count).Select(_ => Tokens(1)).ToArray(), bound);
            foreach (var c in next) c.Dispose();
            return count;
        }


        Time("decode, 1 row, base", () => Decode(1, false));
        Time($"decode, {rows} rows, base", () => Decode(rows, false));
        Time("decode, 1 row, LoRA", () => Decode(1, true));
        Time($"decode, {rows} rows over 8 LoRA adapters", () => Decode(rows, true));
        Time("prefill 50 tokens alone, LoRA", () =>
        {
            using var cache = new KvCache(model, 50);
            using var bound = set.Bind(Enumerable.Repeat(0, 50).ToArray());
            model.DecodeBatch(new[] { cache }, new[] { Tokens(50) }, bound);
            return 50;
        });
        Time($"prefill 50 tokens beside {rows - 1} decoding rows, LoRA", () =>
        {
            using var cache = new KvCache(model, 50);
            var next = caches.Take(rows - 1).Select(c => new KvCache(model, 1, c)).ToArray();
            var seqs = next.Prepend(cache).ToArray();
            var toks = Enumerable.Range(0, rows - 1).Select(_ => Tokens(1)).Prepend(Tokens(50)).ToArray();
            using var bound = set.Bind(Enumerable.Repeat(0, 50).Concat(Enumerable.Range(0, rows - 1).Select(i => i * 8 / (rows - 1))).ToArray());
            model.DecodeBatch(seqs, toks, bound);
            foreach (var c in next) c.Dispose();
            return rows - 1 + 50;
        });
        if (cases.Count > 0)
        {
            Console.WriteLine("| step | time | rate |");
            Console.WriteLine("| --- | ---: | ---: |");
        }

        // Every case once for half a second first, so none is timed while the JIT still tiers the code it runs.
        foreach (var (_, step) in cases) For(0.5, step);
        foreach (var (what, step) in cases)
        {
            var (ms, tokens) = For(seconds, step);
            Console.WriteLine($"| {what} | {ms:F2} ms | {tokens * flopsPerToken / ms / 1e6:F1} GFLOP/s (weights) |");
        }

        foreach (var c in caches) c.Dispose();
        if (only == null || "draw".Contains(only, StringComparison.Ordinal)) Draws(seconds);
    }

    /// <summary>
    /// One sampled token over Llama 3's 128,256-token vocabulary (OpenAI's default temperature 1, top-p 0.9, top-k 50),
    /// flat logits and logits with a few dozen likely tokens, against the sort of the whole vocabulary alone (what
    /// sampling cost per token before it stopped sorting).
    /// </summary>
    private static void Draws(double seconds)
    {
        var data = new Random(1);
        var flat = Enumerable.Range(0, 128256).Select(_ => (float)(data.NextDouble() * 10)).ToArray();
        var peaked = flat.Select(l => data.NextDouble() < 0.001 ? l + 15 : l).ToArray();
        Console.WriteLine("| draw over 128,256 tokens | flat logits | peaked logits |");
        Console.WriteLine("| --- | ---: | ---: |");
        foreach (var (what, k, p) in new[] { ("temperature 1", 0, 1f), ("top-p 0.9", 0, 0.9f), ("top-k 50", 50, 1f) })
        {
            var rng = new Random(2);
            double Ms(float[] logits) => For(seconds / 4, () => Generator.Draw(logits, 1f, k, p, rng)).Ms;
            Console.WriteLine($"| {what} | {Ms(flat):F2} ms | {Ms(peaked):F2} ms |");
        }

        double sort = For(seconds / 4, () => Enumerable.Range(0, flat.Length).OrderByDescending(j => flat[j]).ToArray().Length).Ms;
        Console.WriteLine($"| the whole vocabulary sorted (the old way's first step) | {sort:F2} ms | |");
    }

    /// <summary>Runs <paramref name="step"/> for <paramref name="seconds"/>: milliseconds and tokens per step.</summary>
    private static (double Ms, double Tokens) For(double seconds, Func<int> step)
    {
        var sw = Stopwatch.StartNew();
        int n = 0, tokens = 0;
        while (sw.Elapsed.TotalSeconds < seconds || n == 0)
        {
            tokens += step();
            n++;
        }

        return (sw.Elapsed.TotalMilliseconds / n, tokens / (double)n);
    }
}
