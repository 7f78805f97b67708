using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Running;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.BitDelta;

namespace PeftSharp.Bench;

/// <summary>
/// A decode step through one Hidden x Hidden linear layer for a batch whose rows belong to different fine-tunes of
/// one base (row i uses variant i mod Variants). Fused: the base product once for the batch, then the 1-bit product
/// straight from the packed sign words. Against (a) a dense fp32 weight copy per variant (each variant's rows through
/// its own weight), (b) decoding each variant's delta to a dense weight and then multiplying, and the base product
/// alone (the floor). The bytes each method must read give GB/s against the measured memory bandwidth.
/// Results are checked against a double computation in setup.
/// </summary>
[Config(typeof(Config))]
public class BitDeltaBench
{
    private Device device = null!;

    /// <summary>The device setup opened (BenchDevice), for callers that time the methods themselves.</summary>
    internal Device Device => device;
    private Tensor x = null!, w = null!, y = null!, scratch = null!;
    private BitDeltaPool pool = null!;
    private IndexTensor rowVariants = null!;
    private Tensor[] dense = null!;
    private VariantGroups groups = null!;

    /// <summary>"rows x variants".</summary>
    [Params("8x8", "32x8", "32x32")]
    public string Batch { get; set; } = "8x8";

    [Params(2048, 4096)]
    public int Hidden { get; set; }

    private int Rows => int.Parse(Batch.Split('x')[0]);

    private int Variants => int.Parse(Batch.Split('x')[1]);

    [GlobalSetup]
    public void Setup()
    {
        device = BenchDevice.Open();
        int h = Hidden, m = Rows, v = Variants;
        var xs = Validate.Uniform(m * h, 1);
        var ws = Validate.Uniform(h * h, 2).Select(t => t * 0.02f).ToArray();
        var data = Enumerable.Range(0, v).Select(i => new BitDeltaData($"v{i}",
            new[] { BitDeltaReference.Pack(Validate.Uniform(h * h, 100 + i), h, h) }, new[] { 0.001f * (i + 1) })).ToArray();
        var assignment = Enumerable.Range(0, m).Select(i => i % v).ToArray();
        x = device.FromArray("x", xs, m, h);
        w = device.FromArray("w", ws, h, h);
        y = device.Zeros("y", m, h);
        scratch = device.Zeros("w_decoded", h, h);
        pool = BitDeltaPool.Create(device, h, h, data);
        rowVariants = device.FromIndices("row_variants", assignment);
        dense = data.Select(d =>
        {
            var t = device.FromArray("w_variant", ws, h, h);
            using var one = BitDeltaPool.Create(device, h, h, new[] { d });
            device.Ops.BitDeltaDecode(one, 0, t, accumulate: true);
            return t;
        }).ToArray();
        groups = new VariantGroups(device, xs, assignment, v, h);

        int words = BitDeltaShape.WordsPerRow(h);
        double Expected(int idx)
        {
            int i = idx / h, n = idx % h, a = assignment[i];
            double acc = 0;
            for (int k = 0; k < h; k++)
            {
                double sign = ((data[a].Signs[0][n * words + k / 32] >> (k % 32)) & 1) != 0 ? 1 : -1;
                acc += (double)xs[i * h + k] * (ws[n * h + k] + data[a].Scales[0] * sign);
            }

            return acc;
        }

        Fused();
        Validate.Sampled("fused 1-bit", y.ToArray(), Expected, 1e-3, samples: 32);
        foreach (var (name, run) in new (string, Action)[] { ("dense per variant", DensePerVariant), ("decode then matmul", DecodeThenMatMul) })
        {
            run();
            Validate.Sampled(name, groups.Scatter(m), Expected, 1e-3, samples: 32);
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var d in dense) d.Dispose();
        foreach (var d in new IDisposable[] { groups, x, w, y, scratch, pool, rowVariants, device }) d.Dispose();
    }

    [Benchmark(Baseline = true, Description = "base matmul only (floor)")]
    public void BaseOnly()
    {
        device.Ops.Linear(x, w, y);
        device.Synchronize(); // a GPU queues its kernels: the time is the work's, not the launch's
    }

    [Benchmark(Description = "fused: base once + 1-bit product")]
    public void Fused()
    {
        device.Ops.Linear(x, w, y);
        device.Ops.BitDeltaMixed(x, y, pool, rowVariants);
        device.Synchronize();
    }

    [Benchmark(Description = "(a) dense fp32 weight per variant")]
    public void DensePerVariant()
    {
        foreach (var g in groups.Groups) device.Ops.Linear(g.X, dense[g.Variant], g.Y);
        device.Synchronize();
    }

    [Benchmark(Description = "(b) decode to dense, then matmul")]
    public void DecodeThenMatMul()
    {
        foreach (var g in groups.Groups)
        {
            device.Ops.Copy(w, scratch);
            device.Ops.BitDeltaDecode(pool, g.Variant, scratch, accumulate: true);
            device.Ops.Linear(g.X, scratch, g.Y);
        }

        device.Synchronize();
    }

    /// <summary>Bytes each method must read at least: weights (fp32 or packed) once, plus the activations.</summary>
    internal static double BytesRead(BenchmarkCase c)
    {
        var p = c.Parameters;
        int h = (int)p["Hidden"];
        var parts = ((string)p["Batch"]).Split('x');
        int m = int.Parse(parts[0]), v = int.Parse(parts[1]);
        double fp32 = 4.0 * h * h, packed = 4.0 * h * BitDeltaShape.WordsPerRow(h), act = 4.0 * m * h * 2;
        return c.Descriptor.WorkloadMethod.Name switch
        {
            nameof(BaseOnly) => fp32 + act,
            nameof(Fused) => fp32 + v * packed + act,
            nameof(DensePerVariant) => v * fp32 + act,
            _ => v * (2 * fp32 + packed) + act, // copy the base, decode over it, read it back
        };
    }

    private sealed class Config : BenchConfig
    {
        public Config()
        {
            AddColumn(RateColumn.Bandwidth(BytesRead, false));
            AddColumn(RateColumn.Bandwidth(BytesRead, true));
        }
    }
}
