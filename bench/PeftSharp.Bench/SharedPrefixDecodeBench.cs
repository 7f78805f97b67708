using BenchmarkDotNet.Attributes;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Model;

namespace PeftSharp.Bench;

/// <summary>
/// End-to-end decode throughput behind a shared prefix (Hydragen's measure): the 20M-parameter model (max positions
/// raised to 17,000), 64 sequences that share a P-token prefix cache and each hold 16 tokens of their own; one
/// DecodeBatch step (all layers, the LM head) for one new token per sequence. Tokens/s = 64 / step time. The prefix
/// cache is computed once in setup (the step under test never recomputes it).
/// </summary>
[Config(typeof(BenchConfig))]
public class SharedPrefixDecodeBench
{
    private const int Batch = 64, Own = 16;
    private Device device = null!;
    private LlamaModel model = null!;
    private KvCache prefix = null!;
    private KvCache[] caches = null!;
    private int[][] next = null!;

    [Params(1024, 4096, 16384)]
    public int Prefix { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        device = new CpuDevice();
        model = LlamaModel.Create(device, ModelBench.ConfigFor("20M") with { MaxPositionEmbeddings = 17000 }, seed: 1);
        var rng = new Random(3);
        prefix = new KvCache(model, Prefix);
        for (int at = 0; at < Prefix; at += 512) model.DecodeStep(prefix, Enumerable.Range(0, Math.Min(512, Prefix - at)).Select(_ => rng.Next(256)).ToArray());
        caches = Enumerable.Range(0, Batch).Select(_ => new KvCache(model, Own + 64, prefix)).ToArray();
        model.DecodeBatch(caches, caches.Select(_ => Enumerable.Range(0, Own).Select(_ => rng.Next(256)).ToArray()).ToArray());
        next = caches.Select(_ => new[] { rng.Next(256) }).ToArray();
        Step();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var c in caches) c.Dispose();
        prefix.Dispose();
        model.Dispose();
        device.Dispose();
    }

    /// <summary>One token for each of the 64 sequences; the caches are rewound so every call does the same work.</summary>
    [Benchmark(Description = "decode step, 64 sequences")]
    public void Step()
    {
        model.DecodeBatch(caches, next);
        foreach (var c in caches) c.Truncate(Own);
    }
}
