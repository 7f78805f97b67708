using System.Diagnostics;
using PeftSharp.Compression;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Variants;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serving-memory [rounds] [requests]
/// The CPU pool's footprint under load: rounds of mixed-variant request batches (base, a 1-bit delta, a sparse delta;
/// prompts of 4 to 40 characters, some behind a shared prefix, 2 to 12 new tokens) on the tiny model, printing after
/// each round the process working set, what the pool keeps, and the live tensors' peak. A footprint, not a timing:
/// the pool should stay near twice the live peak however many rounds run.
/// </summary>
internal static class ServingMemory
{
    public static void Run(string[] args)
    {
        int rounds = args.Length > 0 ? int.Parse(args[0]) : 25;
        int requests = args.Length > 1 ? int.Parse(args[1]) : 1000;
        using var device = new CpuDevice();
        var config = LlamaConfig.Tiny;
        using var model = LlamaModel.Create(device, config, seed: 1);
        using var fine = LlamaModel.FromTensors(device, config, (name, _) =>
            model[name].Value.ToArray().Select((v, i) => v + 0.01f * ((int)((uint)i * 2654435761u >> 16) % 3 - 1)).ToArray());
        var linear = LoraAdapterConfig.LlamaLinearModules(config).Select(m => m + ".weight").ToArray();
        var bits = BitDelta.Compress(model, fine, rounds: 1);
        var sparse = SparseDelta.Between(model, fine, linear.ToDictionary(n => n, n => Enumerable.Range(0, model[n].Value.Length).Where(i => i % 50 == 0).ToArray()));
        using var set = new VariantSet(model);
        set.AddDelta("bits", bits);
        set.AddSparse("sparse", sparse);
        string?[] variants = { null, "bits", "sparse" };
        var rng = new Random(5);
        Console.WriteLine($"// tiny model ({model.ParameterCount:N0} parameters, {model.ParameterCount * 4 / 1024.0 / 1024:F1} MiB fp32), {requests} requests a round, " +
            $"{Environment.ProcessorCount} threads, {device.Info.Detail}");
        Console.WriteLine("| round | seconds | working set MiB | pool keeps MiB | live peak MiB | managed heap MiB |");
        Console.WriteLine("| ---: | ---: | ---: | ---: | ---: | ---: |");
        using var process = Process.GetCurrentProcess();
        for (int round = 1; round <= rounds; round++)
        {
            var batch = Enumerable.Range(0, requests).Select(_ => new GenerationRequest(
                new string(Enumerable.Range(0, rng.Next(4, 41)).Select(_ => (char)rng.Next('a', 'z' + 1)).ToArray()),
                variants[rng.Next(variants.Length)], MaxTokens: rng.Next(2, 13), Seed: rng.Next(),
                SharedPrefix: rng.Next(3) == 0 ? "You are a helpful assistant. " : null)).ToList();
            var clock = Stopwatch.StartNew();
            BatchGenerator.Generate(model, batch, set);
            process.Refresh();
            var (_, peak) = device.PoolLiveBytes;
            if (round == 1 || round % 5 == 0 || round == rounds)
            {
                Console.WriteLine($"| {round} | {clock.Elapsed.TotalSeconds:F1} | {process.WorkingSet64 / 1048576.0:F0} | {device.CachedBytes / 1048576.0:F0} | {peak / 1048576.0:F0} | " +
                    $"{GC.GetTotalMemory(false) / 1048576.0:F0} |");
            }
        }
    }
}
