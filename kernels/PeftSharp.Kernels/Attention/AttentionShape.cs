namespace PeftSharp.Kernels.Attention;

/// <summary>
/// Dimensions of grouped-query attention, passed to kernels by value.
/// q (B, Tq, H, D); k, v (B, Tk, Hkv, D); o (B, Tq, H, D); lse (B, H, Tq).
/// Causal masking is bottom-right aligned: query i sits at position i + (Tk - Tq) and sees keys j &lt;= that,
/// so Tq = Tk is ordinary causal attention and Tq = 1 is a decode step over a cache. A sliding window W (Mistral's
/// sliding_window; 0: none) also hides the keys W or more positions back: query position p sees keys p - W &lt; j &lt;= p.
/// </summary>
public readonly struct AttentionShape
{
    public AttentionShape(int batch, int queries, int keys, int heads, int kvHeads, int headDim, bool causal, float scale, int window = 0)
    {
        Window = causal && window > 0 ? window : 0;
        B = batch;
        Tq = queries;
        Tk = keys;
        H = heads;
        Hkv = kvHeads;
        D = headDim;
        Causal = causal ? 1 : 0;
        Scale = scale;
    }

    public int B { get; }
    public int Tq { get; }
    public int Tk { get; }
    public int H { get; }
    public int Hkv { get; }
    public int D { get; }
    /// <summary>1 for causal masking. An int so every ILGPU backend takes it as is.</summary>
    public int Causal { get; }
    /// <summary>Multiplies q.k, usually 1/sqrt(D).</summary>
    public float Scale { get; }

    /// <summary>The sliding window W (causal only): a query sees at most its W latest keys. 0: no window.</summary>
    public int Window { get; }

    /// <summary>Query heads per key/value head.</summary>
    public int Group => H / Hkv;

    /// <summary>One past the last key query i sees (0 .. Tk): it sees keys <see cref="FirstKey"/>(i) .. VisibleKeys(i) - 1.</summary>
    public int VisibleKeys(int i)
    {
        if (Causal == 0) return Tk;
        int last = i + Tk - Tq; // index of the last visible key
        return last < 0 ? 0 : (last + 1 < Tk ? last + 1 : Tk);
    }

    /// <summary>The first key query i sees (0 without a window).</summary>
    public int FirstKey(int i)
    {
        if (Window == 0) return 0;
        int first = i + Tk - Tq - Window + 1;
        return first < 0 ? 0 : (first < Tk ? first : Tk);
    }

    /// <summary>One past the last query that sees key j (Tq without a window).</summary>
    public int EndQuery(int j)
    {
        if (Window == 0) return Tq;
        int end = j - (Tk - Tq) + Window;
        return end < 0 ? 0 : (end < Tq ? end : Tq);
    }

    /// <summary>First query index that sees key j (Tq when none does).</summary>
    public int FirstQuery(int j)
    {
        if (Causal == 0) return 0;
        int first = j - (Tk - Tq);
        return first < 0 ? 0 : first;
    }

    /// <summary>
    /// The query rows that read key/value head hk, numbered r = i G + (h - hk G) over the Tq queries of its G heads (as
    /// the tiled kernels take them): row r is query <see cref="RowQuery"/> of head <see cref="RowHead"/>.
    /// </summary>
    public int RowQuery(int r) => r / Group;

    /// <summary>The head of row r of key/value head hk (see <see cref="RowQuery"/>).</summary>
    public int RowHead(int hk, int r) => hk * Group + r % Group;

    public int QIndex(int b, int i, int h) => ((b * Tq + i) * H + h) * D;

    public int KIndex(int b, int j, int hk) => ((b * Tk + j) * Hkv + hk) * D;

    /// <summary>lse is (B, Tq, H): one entry per row of o, in o's row order, so flattening (B, Tq) keeps it aligned.</summary>
    public int LseIndex(int b, int h, int i) => (b * Tq + i) * H + h;
}
