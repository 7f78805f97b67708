using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// What a config will hold on a device, computed before anything is allocated, so a config that could never fit is
/// refused with the figure it needs instead of failing deep inside an allocation (or taking the machine into swap).
/// The check is against the device's whole memory (<see cref="DeviceInfo.MemoryBytes"/>: the GPU's memory, or on the
/// CPU what the runtime may use), so it refuses the impossible, not what would fit once other buffers are freed.
/// </summary>
public static class ModelMemory
{
    /// <summary>The largest element count one tensor can hold (its length is an int).</summary>
    public const long MaxTensorElements = int.MaxValue;

    /// <summary>Bytes of the fp32 weights of <paramref name="config"/> (gradients come only with training and are not counted).</summary>
    public static long WeightBytes(LlamaConfig config) => checked(LlamaWeights.Shapes(config).Sum(s => Elements(s.Shape)) * sizeof(float));

    /// <summary>Bytes of the keys and values of <paramref name="positions"/> cached positions over every layer.</summary>
    public static long KvCacheBytes(LlamaConfig config, long positions) =>
        checked(2L * config.NumHiddenLayers * positions * config.NumKeyValueHeads * config.HeadDim * sizeof(float));

    /// <summary>Elements of a tensor of <paramref name="shape"/>, in checked arithmetic.</summary>
    public static long Elements(IEnumerable<int> shape) => shape.Aggregate(1L, (a, b) => checked(a * b));

    /// <summary>Tensors of <paramref name="config"/> that exceed <see cref="MaxTensorElements"/>, as messages.</summary>
    public static IEnumerable<string> OversizedTensors(LlamaConfig config) =>
        LlamaWeights.Shapes(config).Where(s => Elements(s.Shape) > MaxTensorElements)
            .Select(s => $"{s.Name} [{string.Join(", ", s.Shape)}] has {Elements(s.Shape):N0} elements, more than one tensor holds ({MaxTensorElements:N0})");

    /// <summary>Refuses, before allocation, weights of <paramref name="config"/> that exceed <paramref name="device"/>'s memory.</summary>
    public static void EnsureWeightsFit(Device device, LlamaConfig config, string source)
    {
        long bytes;
        try
        {
            bytes = WeightBytes(config);
        }
        catch (OverflowException)
        {
            bytes = long.MaxValue;
        }

        EnsureFits(device, bytes, $"{source}: the weights ({config.NumHiddenLayers} layers, hidden_size {config.HiddenSize}, vocab_size {config.VocabSize}) as fp32");
    }

    /// <summary>Refuses <paramref name="bytes"/> more than <paramref name="device"/>'s memory, naming <paramref name="what"/>.</summary>
    public static void EnsureFits(Device device, long bytes, string what)
    {
        long have = device.Info.MemoryBytes;
        if (have > 0 && bytes > have) throw new PeftSharpInputException($"{what} need {Describe(bytes)}; {device.Info.Spec} has {Describe(have)}");
    }

    /// <summary>A byte count as people read it (KiB, MiB, GiB, TiB).</summary>
    public static string Describe(long bytes)
    {
        string[] units = { "bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
        double v = bytes;
        int u = 0;
        while (v >= 1024 && u < units.Length - 1)
        {
            v /= 1024;
            u++;
        }

        return u == 0 ? $"{bytes} bytes" : $"{v:0.##} {units[u]}";
    }
}
