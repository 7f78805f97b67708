using PeftSharp.Engine;

namespace PeftSharp.Compression;

/// <summary>One linear module's 1-bit delta: per round a packed sign matrix (N, W) and its scale.</summary>
public sealed record BitDeltaModule(IReadOnlyList<int[]> Signs, float[] Scales)
{
    public int Rounds => Signs.Count;

    public BitDeltaData ToPoolData(string name) => new(name, Signs, Scales);
}
