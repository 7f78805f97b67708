using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Trainer.Commands;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serve-load [tiny|20M] [requests] [clients]
/// The library scheduler under load: a fixed set of requests over 8 LoRA adapters and the base (random weights,
/// greedy, each request its own max tokens, stop tokens off, so every mode generates the same tokens), run (1) one at a time through a
/// <see cref="VariantServer"/>, (2) by N concurrent clients against it (continuous batching), (3) as one closed
/// <see cref="BatchGenerator"/> batch. Reports generated tokens/s, time to first token (the first streamed piece)
/// and per-token latency percentiles. The same two client modes run again over HTTP: `peft serve`'s endpoints
/// (<see cref="OpenAiEndpoints"/>, Kestrel on 127.0.0.1) with streamed /v1/completions, one HttpClient per client.
/// </summary>
internal static class ServeLoad
{
    public static void Run(string[] args)
    {
        string size = args.Length > 0 ? args[0] : "20M";
        int count = args.Length > 1 ? int.Parse(args[1]) : 64;
        int clients = args.Length > 2 ? int.Parse(args[2]) : 16;
        const int meanTokens = 32;
        using var device = new CpuDevice();
        // An untied LM head whose rows for bytes 128-255 are zero: the random model then emits ASCII (a zero logit loses
        // to the largest of the 128 random ones), whole characters, as a trained model's tokens are. Random bytes past
        // 127 would mostly be incomplete UTF-8, which the streams rightly hold back, so the first text would come
        // several tokens after the first token, more so at 16 rows, whose steps are longer.
        var config = ModelBench.ConfigFor(size) with { TieWordEmbeddings = false };
        using var model = LlamaModel.Create(device, config, seed: 3);
        var head = model["lm_head.weight"].Value;
        var rows = head.ToArray();
        Array.Clear(rows, 128 * config.HiddenSize, 128 * config.HiddenSize);
        head.CopyFrom(rows);
        var rng = new Random(11);
        var adapters = Enumerable.Range(0, 8).ToDictionary(i => "lora" + i, i => RandomLora(config, 8, 100 + i));
        var requests = Enumerable.Range(0, count).Select(i => new GenerationRequest(
            "Request " + i + ": " + new string((char)('a' + i % 26), 20 + rng.Next(40)), i % 9 == 8 ? null : "lora" + i % 8,
            MaxTokens: meanTokens / 2 + rng.Next(meanTokens + 1))).ToArray();
        // Stop tokens off: every request generates its max tokens (16-48, as vLLM's benchmark draws output lengths from a
        // range), so all modes do the same work; with one length for all, the clients' requests would end and start
        // together and every wave of 16 prompts would prefill at once. The prefix cache is off too:
        // the modes run the same prompts one after another, and cached prompts would skip the later modes' prefill.
        model.StopTokens = Array.Empty<int>();
        Console.WriteLine($"// {size} model ({model.ParameterCount:N0} parameters), {count} requests over 8 LoRA adapters (rank 8, all linear) and the base, " +
            $"prompts 30-70 bytes, {meanTokens / 2}-{meanTokens * 3 / 2} new tokens each ({requests.Sum(r => r.MaxTokens)} in all), {Environment.ProcessorCount} threads, {device.Info.Detail}");

        using var server = new VariantServer(model, new VariantServerOptions { MaxRows = clients, MaxLoras = 8, PrefixCache = false });
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

        double closed = requests.Sum(r => r.MaxTokens) / sw.Elapsed.TotalSeconds;
        HttpRows http;
        using (var app = OpenAiEndpoints.Build(server, "bench", "http://127.0.0.1:0"))
        {
            app.StartAsync().GetAwaiter().GetResult();
            var url = new Uri(app.Urls.First());
            MeasureHttp(url, requests.Take(clients).ToArray(), clients); // warm-up: the HTTP path's JIT
            http = new HttpRows(MeasureHttp(url, requests, 1), MeasureHttp(url, requests, clients));
            app.StopAsync().GetAwaiter().GetResult();
        }

        Console.WriteLine("| mode | tokens/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | per-token p50 ms | per-token p90 ms |");
        Console.WriteLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        Row("one at a time", lone);
        Row($"{clients} concurrent clients", concurrent);
        Row("one at a time, HTTP (127.0.0.1)", http.Lone);
        Row($"{clients} concurrent clients, HTTP (127.0.0.1)", http.Concurrent);
        Console.WriteLine($"| closed batch (`generate --requests`) | {closed:F1} | | | | | |");
        Console.WriteLine($"// continuous batching / one at a time: {concurrent.Rate / lone.Rate:F2}x throughput; " +
            $"p50 TTFT {Percentile(concurrent.Ttft, 50) / Percentile(lone.Ttft, 50):F2}x a lone request's");
        Console.WriteLine($"// over HTTP: {http.Concurrent.Rate / http.Lone.Rate:F2}x throughput; " +
            $"p50 TTFT {Percentile(http.Concurrent.Ttft, 50) / Percentile(http.Lone.Ttft, 50):F2}x a lone request's");
    }

    private sealed record HttpRows((double Rate, double[] Ttft, double[] PerToken) Lone, (double Rate, double[] Ttft, double[] PerToken) Concurrent);

    /// <summary>
    /// As <see cref="Measure"/>, through the HTTP server: each client POSTs streamed /v1/completions (greedy, the
    /// request's max tokens) and reads the server-sent events; the first event with text is the first token, the
    /// last event's usage gives the token count. One HttpClient, which opens a connection per concurrent request.
    /// </summary>
    private static (double Rate, double[] Ttft, double[] PerToken) MeasureHttp(Uri url, GenerationRequest[] requests, int clients)
    {
        using var http = new HttpClient { BaseAddress = url, Timeout = TimeSpan.FromMinutes(10) };
        return Drive(requests, clients, async (r, start) =>
        {
            var body = new JsonObject
            {
                ["model"] = r.Variant ?? "bench", ["prompt"] = r.Prompt, ["max_tokens"] = r.MaxTokens, ["temperature"] = 0, ["stream"] = true,
            };
            double first = -1;
            int count = 0;
            using var message = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
            using var response = await http.SendAsync(message, HttpCompletionOption.ResponseHeadersRead);
            response.EnsureSuccessStatusCode();
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
            while (await reader.ReadLineAsync() is { } line)
            {
                if (!line.StartsWith("data: {", StringComparison.Ordinal)) continue;
                var chunk = JsonNode.Parse(line["data: ".Length..])!;
                if (first < 0 && chunk["choices"]![0]!["text"]!.GetValue<string>().Length > 0) first = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                if (chunk["usage"] is JsonObject usage) count = usage["completion_tokens"]!.GetValue<int>();
            }

            return (first, count, null);
        });
    }

    private static void Row(string mode, (double Rate, double[] Ttft, double[] PerToken) m) =>
        Console.WriteLine($"| {mode} | {m.Rate:F1} | {Percentile(m.Ttft, 50):F1} | {Percentile(m.Ttft, 90):F1} | {Percentile(m.Ttft, 99):F1} | " +
            $"{Percentile(m.PerToken, 50):F2} | {Percentile(m.PerToken, 90):F2} |");

    /// <summary>Clients each take the next request and stream it to the end through the library; times in milliseconds.</summary>
    private static (double Rate, double[] Ttft, double[] PerToken) Measure(VariantServer server, GenerationRequest[] requests, int clients) =>
        Drive(requests, clients, async (r, start) =>
        {
            double first = -1;
            var handle = server.Start(r);
            await foreach (var _ in handle.Text.ReadAllAsync())
            {
                if (first < 0) first = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            }

            var result = await handle.Result;
            return (first, result.Tokens, result);
        });

    /// <summary>
    /// <paramref name="clients"/> workers each take the next request and run it to the end with <paramref name="run"/>
    /// (given the start timestamp; it answers the time to its first text, or -1, and the tokens generated).
    /// </summary>
    private static (double Rate, double[] Ttft, double[] PerToken) Drive(GenerationRequest[] requests, int clients,
        Func<GenerationRequest, long, Task<(double First, int Tokens, GenerationResult? Result)>> run)
    {
        var ttft = new double[requests.Length];
        var firstToken = new double[requests.Length];
        var queue = new double[requests.Length];
        bool timed = false;
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
                var (first, count, result) = await run(requests[i], start);
                if (result != null)
                {
                    timed = true;
                    firstToken[i] = result.TimeToFirstToken.TotalMilliseconds;
                    queue[i] = result.QueueTime.TotalMilliseconds;
                }

                double total = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                ttft[i] = first < 0 ? total : first;
                perToken[i] = count > 1 ? (total - ttft[i]) / (count - 1) : 0;
                Interlocked.Add(ref tokens, count);
            }
        })).ToArray();
        Task.WaitAll(workers);
        if (timed)
        {
            // The server's own view: how long requests queued, and when their first token (not yet text) came.
            Console.WriteLine($"//   {clients} client(s): queue p50 {Percentile(queue, 50):F1} ms, first token p50 {Percentile(firstToken, 50):F1} ms " +
                $"(p90 {Percentile(firstToken, 90):F1}), first text p50 {Percentile(ttft, 50):F1} ms");
        }

        return (tokens / sw.Elapsed.TotalSeconds, ttft, perToken);
    }

    private static double Percentile(double[] values, int p)
    {
        var sorted = values.OrderBy(v => v).ToArray();
        return sorted[Math.Min(sorted.Length - 1, (int)Math.Ceiling(p / 100.0 * sorted.Length) - 1)];
    }

    internal static PeftLoraAdapter RandomLora(LlamaConfig c, int rank, int seed)
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
