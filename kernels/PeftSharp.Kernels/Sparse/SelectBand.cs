namespace PeftSharp.Kernels.Sparse;

/// <summary>
/// The band of ranks a selection keeps. Entries are ranked by score, largest first, ties by lower index; the band is
/// ranks [Lo, Hi). KeyLo / KeyHi are the sort keys of the entries at ranks Lo and Hi - 1; among entries whose key
/// equals KeyLo, those at index-order positions &gt;= LoStart are kept, among those equal to KeyHi the ones at
/// positions &lt; HiEnd (both rules apply when the keys are equal).
/// </summary>
public struct SelectBand
{
    public uint KeyLo;
    public uint KeyHi;
    public int LoStart;
    public int HiEnd;
    public int Chunk;
    public int Length;
}
