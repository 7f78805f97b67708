using BenchmarkDotNet.Attributes;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Bench;

/// <summary>
/// A batch of 32 requests through one 2048 x 2048 linear layer, the requests spread over 1, 8 or 32 LoRA adapters of
/// rank 8, 16 or 64. Mixed: the base product once for the batch plus one mixed-adapter launch. Against (a) each
/// adapter's rows as their own batch (base + LoRA per group), (b) a weight merged per request (W + s B A, then that
/// row's product), and (c) the base product alone, the floor. All validated against a double computation in setup.
/// </summary>
[Config(typeof(Config))]
public class LoraBench
{
    private const int Rows = 32, Hidden = 2048;
    private Device device = null!;

    /// <summary>The device setup opened (BenchDevice), for callers that time the methods themselves.</summary>
    internal Device Device => device;
    private Tensor x = null!, w = null!, y = null!, merged = null!;
    private LoraAdapterPool pool = null!;
    private IndexTensor rowAdapters = null!;
    private List<(int Adapter, int[] Rows, Tensor X, Tensor Y, Tensor T, Tensor A, Tensor B, IndexTensor Ids)> groups = null!;
    private Tensor[] rowX = null!, rowY = null!, adapterA = null!, adapterB = null!;
    private float[] xs = null!, ws = null!;
    private LoraAdapterData[] adapters = null!;
    private int[] assignment = null!;

    [Params(1, 8, 32)]
    public int Adapters { get; set; }

    [Params(8, 16, 64)]
    public int Rank { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        device = BenchDevice.Open();
        xs = Validate.Uniform(Rows * Hidden, 1);
        ws = Validate.Uniform(Hidden * Hidden, 2).Select(v => v * 0.02f).ToArray();
        adapters = Enumerable.Range(0, Adapters).Select(a => new LoraAdapterData($"a{a}",
            Validate.Uniform(Rank * Hidden, 10 + a).Select(v => v * 0.02f).ToArray(), Validate.Uniform(Hidden * Rank, 50 + a).Select(v => v * 0.02f).ToArray(), Rank, 2f)).ToArray();
        assignment = Enumerable.Range(0, Rows).Select(i => i % Adapters).ToArray();
        x = device.FromArray("x", xs, Rows, Hidden);
        w = device.FromArray("w", ws, Hidden, Hidden);
        y = device.Zeros("y", Rows, Hidden);
        merged = device.Zeros("w_merged", Hidden, Hidden);
        pool = LoraAdapterPool.Create(device, Hidden, Hidden, adapters);
        rowAdapters = device.FromIndices("row_adapters", assignment);
        adapterA = adapters.Select(a => device.FromArray("A", a.A, Rank, Hidden)).ToArray();
        adapterB = adapters.Select(a => device.FromArray("B", a.B, Hidden, Rank)).ToArray();
        groups = Enumerable.Range(0, Adapters).Select(a =>
        {
            var rows = Enumerable.Range(0, Rows).Where(i => assignment[i] == a).ToArray();
            var gx = device.FromArray("x_group", rows.SelectMany(i => xs.AsSpan(i * Hidden, Hidden).ToArray()).ToArray(), rows.Length, Hidden);
            return (a, rows, gx, device.Zeros("y_group", rows.Length, Hidden), device.Zeros("t_group", rows.Length, Rank), adapterA[a], adapterB[a], device.FromIndices("ids", rows));
        }).ToList();
        rowX = Enumerable.Range(0, Rows).Select(i => device.FromArray("x_row", xs.AsSpan(i * Hidden, Hidden), 1, Hidden)).ToArray();
        rowY = Enumerable.Range(0, Rows).Select(_ => device.Zeros("y_row", 1, Hidden)).ToArray();

        double Expected(int idx)
        {
            int i = idx / Hidden, n = idx % Hidden, a = assignment[i];
            double baseDot = 0;
            for (int k = 0; k < Hidden; k++) baseDot += (double)xs[i * Hidden + k] * ws[n * Hidden + k];
            double lora = 0;
            for (int q = 0; q < Rank; q++)
            {
                double t = 0;
                for (int k = 0; k < Hidden; k++) t += (double)xs[i * Hidden + k] * adapters[a].A[q * Hidden + k];
                lora += t * adapters[a].B[n * Rank + q];
            }

            return baseDot + adapters[a].Scale * lora;
        }

        Mixed();
        Validate.Sampled("mixed lora", y.ToArray(), Expected, 1e-3, samples: 32);
        PerAdapterBatches();
        var fromGroups = new float[Rows * Hidden];
        foreach (var g in groups)
        {
            var gy = g.Y.ToArray();
            for (int j = 0; j < g.Rows.Length; j++) gy.AsSpan(j * Hidden, Hidden).CopyTo(fromGroups.AsSpan(g.Rows[j] * Hidden, Hidden));
        }

        Validate.Sampled("per-adapter batches", fromGroups, Expected, 1e-3, samples: 32);
        MergedPerRequest();
        var fromMerged = rowY.SelectMany(t => t.ToArray()).ToArray();
        Validate.Sampled("merged per request", fromMerged, Expected, 1e-3, samples: 32);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var g in groups)
        {
            g.X.Dispose();
            g.Y.Dispose();
            g.T.Dispose();
            g.Ids.Dispose();
        }

        foreach (var d in rowX.Concat(rowY).Concat(adapterA).Concat(adapterB)) d.Dispose();
        foreach (var d in new IDisposable[] { x, w, y, merged, pool, rowAdapters, device }) d.Dispose();
    }

    [Benchmark(Baseline = true, Description = "(c) base matmul only (floor)")]
    public void BaseOnly()
    {
        device.Ops.Linear(x, w, y);
        device.Synchronize(); // a GPU queues its kernels: the time is the work's, not the launch's
    }

    [Benchmark(Description = "mixed-adapter batch")]
    public void Mixed()
    {
        device.Ops.Linear(x, w, y);
        device.Ops.LoraMixed(x, y, pool, rowAdapters);
        device.Synchronize();
    }

    /// <summary>(a): every adapter's rows run as their own batch: base product, shrink, expand (rows pre-gathered).</summary>
    [Benchmark(Description = "(a) each adapter's rows as a batch")]
    public void PerAdapterBatches()
    {
        foreach (var g in groups)
        {
            device.Ops.Linear(g.X, w, g.Y);
            device.Ops.Linear(g.X, g.A, g.T);
            device.Ops.MatMul(g.T, g.B, g.Y, transposeB: true, alpha: adapters[g.Adapter].Scale, beta: 1f);
        }

        device.Synchronize();
    }

    /// <summary>(b): per request, W' = W + s B A formed densely, then that row's product.</summary>
    [Benchmark(Description = "(b) weight merged per request")]
    public void MergedPerRequest()
    {
        for (int i = 0; i < Rows; i++)
        {
            int a = assignment[i];
            device.Ops.Copy(w, merged);
            device.Ops.MatMul(adapterB[a], adapterA[a], merged, alpha: adapters[a].Scale, beta: 1f);
            device.Ops.Linear(rowX[i], merged, rowY[i]);
        }

        device.Synchronize();
    }

    /// <summary>Bytes a method must read at least: the base weight once per product, the adapters' A and B, x and y.</summary>
    internal static double BytesRead(BenchmarkDotNet.Running.BenchmarkCase c)
    {
        int adapters = (int)c.Parameters["Adapters"], rank = (int)c.Parameters["Rank"];
        double w = 4.0 * Hidden * Hidden, lora = 4.0 * 2 * rank * Hidden, act = 4.0 * Rows * Hidden * 2;
        return c.Descriptor.WorkloadMethod.Name switch
        {
            nameof(BaseOnly) => w + act,
            nameof(Mixed) => w + adapters * lora + act,
            nameof(PerAdapterBatches) => adapters * (w + lora) + act,
            _ => Rows * (3 * w + lora) + act, // copy W, add B A over it, read it back per request
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
