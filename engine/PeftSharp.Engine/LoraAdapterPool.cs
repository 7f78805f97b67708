namespace PeftSharp.Engine;

/// <summary>
/// Many LoRA adapters of one linear layer in a single device pool, ranks free to differ, so one launch serves a
/// batch whose rows each pick their adapter (or none). Layout as <c>LoraBatchShape</c> describes.
/// </summary>
public sealed class LoraAdapterPool : IDisposable
{
    private LoraAdapterPool(Device device, int inFeatures, int outFeatures, IReadOnlyList<LoraAdapterData> adapters)
    {
        Device = device;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        Names = adapters.Select(a => a.Name).ToArray();
        RanksHost = adapters.Select(a => a.Rank).ToArray();
        ScalesHost = adapters.Select(a => a.Scale).ToArray();
        AOffsetsHost = new int[adapters.Count];
        BOffsetsHost = new int[adapters.Count];
        int ao = 0, bo = 0;
        for (int i = 0; i < adapters.Count; i++)
        {
            AOffsetsHost[i] = ao;
            BOffsetsHost[i] = bo;
            ao += adapters[i].Rank * inFeatures;
            bo += outFeatures * adapters[i].Rank;
        }

        MaxRank = adapters.Count == 0 ? 0 : adapters.Max(a => a.Rank);
        APool = device.FromArray("lora_A pool", adapters.SelectMany(a => a.A).ToArray(), ao);
        BPool = device.FromArray("lora_B pool", adapters.SelectMany(a => a.B).ToArray(), bo);
        AOffsets = device.FromIndices("lora_A offsets", AOffsetsHost);
        BOffsets = device.FromIndices("lora_B offsets", BOffsetsHost);
        Ranks = device.FromIndices("lora ranks", RanksHost);
        Scales = device.FromArray("lora scales", ScalesHost, adapters.Count);
    }

    public Device Device { get; }
    public int InFeatures { get; }
    public int OutFeatures { get; }
    public int Count => Names.Count;
    public int MaxRank { get; }
    public IReadOnlyList<string> Names { get; }

    internal int[] RanksHost { get; }
    internal float[] ScalesHost { get; }
    internal int[] AOffsetsHost { get; }
    internal int[] BOffsetsHost { get; }
    internal Tensor APool { get; }
    internal Tensor BPool { get; }
    /// <summary>
    /// Every adapter's B transposed, B_a^T (r_a, N) row-major at <see cref="BOffsetsHost"/>[a], for the CPU backend's
    /// expand product y += s t B^T: with K = r (8-64) a dot product per output spent its time entering and leaving
    /// the dot; rows of B^T are streamed as whole vectors instead. Built on first use (the pool never changes).
    /// </summary>
    internal float[] BTransposedHost(float[] bPool, int offset)
    {
        return LazyInitializer.EnsureInitialized(ref bTransposed, () =>
        {
            var bt = new float[BOffsetsHost.Length == 0 ? 0 : BOffsetsHost[^1] + OutFeatures * RanksHost[^1]];
            for (int a = 0; a < RanksHost.Length; a++)
            {
                int r = RanksHost[a], o = BOffsetsHost[a];
                for (int n = 0; n < OutFeatures; n++)
                {
                    for (int j = 0; j < r; j++) bt[o + j * OutFeatures + n] = bPool[offset + o + n * r + j];
                }
            }

            return bt;
        });
    }

    private float[]? bTransposed;

    internal IndexTensor AOffsets { get; }
    internal IndexTensor BOffsets { get; }
    internal IndexTensor Ranks { get; }
    internal Tensor Scales { get; }

    /// <summary>Uploads the adapters; every shape is checked and every offender named.</summary>
    public static LoraAdapterPool Create(Device device, int inFeatures, int outFeatures, IReadOnlyList<LoraAdapterData> adapters)
    {
        var problems = new List<string>();
        foreach (var a in adapters)
        {
            if (a.Rank <= 0) problems.Add($"adapter '{a.Name}' has rank {a.Rank}");
            else
            {
                if (a.A.Length != a.Rank * inFeatures) problems.Add($"adapter '{a.Name}' lora_A has {a.A.Length} values, expected [{a.Rank}, {inFeatures}]");
                if (a.B.Length != outFeatures * a.Rank) problems.Add($"adapter '{a.Name}' lora_B has {a.B.Length} values, expected [{outFeatures}, {a.Rank}]");
            }
        }

        if (problems.Count > 0) throw new ArgumentException($"LoRA pool for a [{outFeatures}, {inFeatures}] layer: {string.Join("; ", problems)}");
        return new LoraAdapterPool(device, inFeatures, outFeatures, adapters);
    }

    public void Dispose()
    {
        APool.Dispose();
        BPool.Dispose();
        AOffsets.Dispose();
        BOffsets.Dispose();
        Ranks.Dispose();
        Scales.Dispose();
    }
}
