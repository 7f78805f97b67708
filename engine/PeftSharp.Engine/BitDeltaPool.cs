using PeftSharp.Kernels.BitDelta;

namespace PeftSharp.Engine;

/// <summary>
/// Many variants' 1-bit deltas of one linear layer in a single device pool, so one launch serves a batch whose rows
/// each pick their variant (or none). Layout as <see cref="BitDeltaShape"/> describes. Memory: N * W * 4 bytes per
/// round, 1/32 of fp32 and 1/16 of fp16; a backend may keep the words in its own order
/// (<see cref="Device.ArrangeBitDeltaWords"/>).
/// </summary>
public sealed class BitDeltaPool : IDisposable
{
    private BitDeltaPool(Device device, int inFeatures, int outFeatures, IReadOnlyList<BitDeltaData> variants)
    {
        Device = device;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        Names = variants.Select(v => v.Name).ToArray();
        FirstHost = new int[variants.Count];
        RoundsHost = variants.Select(v => v.Signs.Count).ToArray();
        for (int i = 1; i < variants.Count; i++) FirstHost[i] = FirstHost[i - 1] + RoundsHost[i - 1];
        ScalesHost = variants.SelectMany(v => v.Scales).ToArray();
        var words = variants.SelectMany(v => v.Signs).SelectMany(s => s).ToArray();
        Signs = device.FromIndices("1-bit signs pool", device.ArrangeBitDeltaWords(words, outFeatures, BitDeltaShape.WordsPerRow(inFeatures)));
        Scales = device.FromArray("1-bit scales", ScalesHost, ScalesHost.Length);
        First = device.FromIndices("1-bit first slot", FirstHost);
        Rounds = device.FromIndices("1-bit rounds", RoundsHost);
    }

    public Device Device { get; }
    public int InFeatures { get; }
    public int OutFeatures { get; }
    public int Count => Names.Count;
    public IReadOnlyList<string> Names { get; }

    /// <summary>Bytes of packed signs and scales this pool holds on the device.</summary>
    public long Bytes => Signs.Length * 4L + Scales.Length * 4L;

    internal int[] FirstHost { get; }
    internal int[] RoundsHost { get; }
    internal float[] ScalesHost { get; }
    internal IndexTensor Signs { get; }
    internal Tensor Scales { get; }
    internal IndexTensor First { get; }
    internal IndexTensor Rounds { get; }

    /// <summary>Uploads the variants; every shape is checked and every offender named.</summary>
    public static BitDeltaPool Create(Device device, int inFeatures, int outFeatures, IReadOnlyList<BitDeltaData> variants)
    {
        int words = outFeatures * BitDeltaShape.WordsPerRow(inFeatures);
        var problems = new List<string>();
        foreach (var v in variants)
        {
            if (v.Signs.Count == 0) problems.Add($"'{v.Name}' has no rounds");
            if (v.Signs.Count != v.Scales.Count) problems.Add($"'{v.Name}' has {v.Signs.Count} sign matrices but {v.Scales.Count} scales");
            for (int j = 0; j < v.Signs.Count; j++)
            {
                if (v.Signs[j].Length != words) problems.Add($"'{v.Name}' round {j} has {v.Signs[j].Length} words, expected [{outFeatures}, {BitDeltaShape.WordsPerRow(inFeatures)}] = {words}");
            }

            if (v.Scales.Any(s => !float.IsFinite(s))) problems.Add($"'{v.Name}' has a non-finite scale");
        }

        if (problems.Count > 0) throw new ArgumentException($"1-bit pool for a [{outFeatures}, {inFeatures}] layer: {string.Join("; ", problems)}");
        return new BitDeltaPool(device, inFeatures, outFeatures, variants);
    }

    public void Dispose()
    {
        Signs.Dispose();
        Scales.Dispose();
        First.Dispose();
        Rounds.Dispose();
    }
}
