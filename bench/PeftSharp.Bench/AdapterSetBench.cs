using BenchmarkDotNet.Attributes;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Bench;

/// <summary>
/// Training several LoRA adapters (rank 8, every linear layer) at once on the 20M model: 4 adapters x 4 sequences of
/// 128 tokens, forward and backward (no optimizer). "one batch" = adapter sets: one pass of 16 sequences, the base
/// products computed once for all rows, each adapter's low-rank path on its own rows. "per adapter" = the naive way:
/// each adapter in its own model, its 4 sequences as its own pass (4 passes; the base weights copied per model).
/// Before anything is timed, setup checks that each adapter's gradient from the joint pass equals its share of its
/// own pass's gradient (relative 1e-3 on the largest entry).
/// </summary>
[Config(typeof(BenchConfig))]
public class AdapterSetBench
{
    private const int Adapters = 4, PerAdapter = 4, SeqLen = 128;
    private static readonly LoraAdapterConfig Lora = new() { R = 8, LoraAlpha = 16, TargetRegex = "all-linear" };
    private Device device = null!;
    private LlamaModel joint = null!;
    private LlamaModel[] separate = null!;
    private int[] tokens = null!, targets = null!;

    [GlobalSetup]
    public void Setup()
    {
        device = new CpuDevice();
        var config = ModelBench.ConfigFor("20M");
        joint = LlamaModel.Create(device, config, seed: 1);
        for (int k = 0; k < Adapters; k++) joint.AddLoraSet($"task{k}", Lora, seed: 10 + k);
        foreach (var l in joint.LoraSets.SelectMany(s => s.Layers.Values)) l.B.Value.CopyFrom(Validate.Uniform(l.B.Value.Length, 5).Select(v => v * 0.01f).ToArray());
        separate = new LlamaModel[Adapters];
        for (int k = 0; k < Adapters; k++)
        {
            separate[k] = LlamaModel.FromTensors(device, config, (name, _) => joint[name].Value.ToArray());
            separate[k].AddLora(Lora, seed: 0, from: joint.ExportLoraSet($"task{k}"));
        }

        var rng = new Random(2);
        tokens = Enumerable.Range(0, Adapters * PerAdapter * SeqLen).Select(_ => rng.Next(256)).ToArray();
        targets = tokens.Skip(1).Append(tokens[0]).ToArray(); // every row has a target, so each adapter's share is 1 / Adapters
        OneBatch();
        PerAdapterPasses();
        for (int k = 0; k < Adapters; k++)
        {
            var a = joint.LoraSets[k].Layers["model.layers.3.mlp.down_proj"].B.Grad.ToArray();
            var b = separate[k].Lora["model.layers.3.mlp.down_proj"].B.Grad.ToArray();
            double scale = b.Max(Math.Abs);
            double worst = a.Zip(b).Max(p => Math.Abs(p.First - p.Second / Adapters));
            if (worst > 1e-3 * scale / Adapters) throw new InvalidOperationException($"adapter {k}: joint and separate gradients differ by {worst:G3} (scale {scale:G3})");
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        joint.Dispose();
        foreach (var m in separate) m.Dispose();
        device.Dispose();
    }

    [Benchmark(Baseline = true, Description = "4 adapters in one batch (adapter sets)")]
    public double OneBatch()
    {
        joint.ZeroGrad();
        return joint.Loss(tokens, targets, Adapters * PerAdapter, backward: true, Enumerable.Repeat(PerAdapter, Adapters).ToArray()).Loss;
    }

    [Benchmark(Description = "each adapter its own pass")]
    public double PerAdapterPasses()
    {
        double sum = 0;
        int rows = PerAdapter * SeqLen;
        for (int k = 0; k < Adapters; k++)
        {
            separate[k].ZeroGrad();
            sum += separate[k].Loss(tokens[(k * rows)..((k + 1) * rows)], targets[(k * rows)..((k + 1) * rows)], PerAdapter, backward: true).Loss;
        }

        return sum;
    }
}
