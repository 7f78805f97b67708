using System.Diagnostics;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serve-load [tiny|20M] [requests] [clients]
/// The library scheduler under load: a fixed set of requests over 8 LoRA adapters and the base (random weights,
/// greedy, fixed max tokens so every mode generates the same token count), run (1) one at a time through a
/// <see cref="VariantServer"/>, (2) by N concurrent clients against it (continuous batching), (3) as one closed
/// <see cref="BatchGenerator"/> batch. Reports generated tokens/s, time to first token (the first streamed piece)
/// and per-token latency percentiles. In-process: the HTTP server (issue 20) is not built yet.
/// </summary>
internal static class ServeLoad
{
    public static void Run(string[] args)
    {
        string size = args.Length > 0 ? args[0] : "20M";
        int count = args.Length > 1 ? int.Parse(args[1]) : 64;
        int clients = args.Length > 2 ? int.Parse(args[2]) : 16;
        const int maxTokens = 32;
        using var device = new CpuDevice();
        var config = ModelBench.ConfigFor(size);
        using var model = LlamaModel.Create(device, config, seed: 3);
        var rng = new Random(11);
        var adapters = Enumerable.Range(0, 8).ToDictionary(i => "lora" + i, i => RandomLora(config, 8, 100 + i));
        var requests = Enumerable.Range(0, count).Select(i => new GenerationRequest(
            "Request " + i + ": " + new string((char)('a' + i % 26), 20 + rng.Next(40)), i % 9 == 8 ? null : "lora" + i % 8, MaxTokens: maxTokens)).ToArray();
        // Stop tokens off: every request generates maxTokens, so all modes do the same work.
        model.StopTokens = Array.Empty<int>();
        Console.WriteLine($"// {size} model ({model.ParameterCount:N0} parameters), {count} requests over 8 LoRA adapters (rank 8, all linear) and the base, " +
            $"prompts 30-70 bytes, {maxTokens} new tokens each, {Environment.ProcessorCount} threads, {device.Info.Detail}");

        using var server = new VariantServer(model, new VariantServerOptions { MaxRows = clients, MaxLoras = 8 });
        foreach (var (name, a) in adapters) server.Load(name, a);
        Measure(server, requests.Take(clients).ToArray(), clients); // warm-up: JIT and every adapter resident once
        var lone = Measure(server, requests, 1);
        var concurrent = Measure(server, requests, clients);
        var sw = Stopwatch.StartNew();
        using (var set = new VariantSet(model))
        {
            foreach (var (name, a) in adapters) set.AddLora(name, a);
            BatchGenerator.Generate(model, requests, set);
        }

        double closed = count * maxTokens / sw.Elapsed.TotalSeconds;
        Console.WriteLine("| mode | tokens/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | per-token p50 ms | per-token p90 ms |");
        Console.WriteLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        Row("one at a time", lone);
        Row($"{clients} concurrent clients", concurrent);
        Console.WriteLine($"| closed batch (`generate --requests`) | {closed:F1} | | | | | |");
        Console.WriteLine($"// continuous batching / one at a time: {concurrent.Rate / lone.Rate:F2}x throughput; " +
            $"p50 TTFT {Percentile(concurrent.Ttft, 50) / Percentile(lone.Ttft, 50):F2}x a lone request's");
    }

    private static void Row(string mode, (double Rate, double[] Ttft, double[] PerToken) m) =>
        Console.WriteLine($"| {mode} | {m.Rate:F1} | {Percentile(m.Ttft, 50):F1} | {Percentile(m.Ttft, 90):F1} | {Percentile(m.Ttft, 99):F1} | " +
            $"{Percentile(m.PerToken, 50):F2} | {Percentile(m.PerToken, 90):F2} |");

    /// <summary>Clients each take the next request and stream it to the end; times in milliseconds.</summary>
    private static (double Rate, double[] Ttft, double[] PerToken) Measure(VariantServer server, GenerationRequest[] requests, int clients)
    {
        var ttft = new double[requests.Length];
        var perToken = new double[requests.Length];
        int next = -1;
        long tokens = 0;
        var sw = Stopwatch.StartNew();
        var workers = Enumerable.Range(0, clients).Select(_ => Task.Run(async () =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < requests.Length)
            {
                long start = Stopwatch.GetTimestamp();
                double first = -1;
                var handle = server.Start(requests[i]);
                await foreach (var _ in handle.Text.ReadAllAsync())
                {
                    if (first < 0) first = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                }

                var result = await handle.Result;
                double total = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                ttft[i] = first < 0 ? total : first;
                perToken[i] = result.Tokens > 1 ? (total - ttft[i]) / (result.Tokens - 1) : 0;
                Interlocked.Add(ref tokens, result.Tokens);
            }
        })).ToArray();
        Task.WaitAll(workers);
        return (tokens / sw.Elapsed.TotalSeconds, ttft, perToken);
    }

    private static double Percentile(double[] values, int p)
    {
        var sorted = values.OrderBy(v => v).ToArray();
        return sorted[Math.Min(sorted.Length - 1, (int)Math.Ceiling(p / 100.0 * sorted.Length) - 1)];
    }

    private static PeftLoraAdapter RandomLora(LlamaConfig c, int rank, int seed)
    {
        var config = new LoraAdapterConfig { R = rank, LoraAlpha = 2 * rank, TargetModules = LoraAdapterConfig.LlamaLinear };
        var rng = new Random(seed);
        var modules = config.TargetsIn(c).ToDictionary(m => m, m =>
        {
            var (o, i) = PeftLoraAdapter.LinearShape(c, m);
            float[] Fill(int n) => Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5) * 0.1f).ToArray();
            return (Fill(rank * i), Fill(o * rank));
        });
        return new PeftLoraAdapter(config, modules);
    }
}
