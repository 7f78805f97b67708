using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Attention;

/// <summary>
/// Attention forward shaped for GPUs: a group of <see cref="Rows"/> threads takes that many query rows of one
/// (b, hk) (the Tq x G queries of the G heads reading key/value head hk, numbered by <see cref="AttentionShape.RowQuery"/>) and walks the keys in tiles of
/// <see cref="Keys"/> that the group loads into shared memory together, so each key and value is read from global
/// memory once per group instead of once per query; each thread keeps its query, its output row and its online
/// softmax in registers or local memory. The keys can be split across groups (flash-decoding): each split writes a
/// normalised partial output and its log-sum-exp, and <see cref="MergeSplitsKernel"/> combines them, so a decode
/// step (few query rows, a long shared prefix) still spreads over the whole device. This is the Hydragen prefix pass:
/// all sequences sharing a prefix arrive as one matrix of queries over its keys. The backward kernels tile the same way
/// (dq over key tiles, dk and dv over tiles of query rows). D is at most <see cref="MaxD"/>.
/// Same results as <see cref="AttentionKernels.ForwardKernel"/> up to rounding; reference:
/// <see cref="AttentionReference"/>.
/// </summary>
public static class TiledAttentionKernels
{
    /// <summary>Query rows per group (threads per group).</summary>
    public const int Rows = 32;

    /// <summary>Keys per shared-memory tile.</summary>
    public const int Keys = 32;

    /// <summary>Largest head dimension the tiles hold (Llama's 128).</summary>
    public const int MaxD = 128;

    /// <summary>
    /// Shared memory the largest of these kernels takes per group (the dk/dv kernel: q and dO tiles, lse and delta):
    /// 33,024 bytes; a device that allows less per group runs the per-row kernels.
    /// </summary>
    public const int SharedBytes = (2 * Rows * MaxD + 2 * Rows) * sizeof(float);

    /// <summary>
    /// Grid (ceil(Tq G / Rows), B Hkv, splits), groups (Rows, 1, 1). Split z covers keys [z chunk, (z + 1) chunk).
    /// With one split o and lse are written; with more, partialO (splits, B, Tq, H, D) and partialLse
    /// (splits, B, Tq, H), to be merged.
    /// </summary>
    public static void ForwardKernel(
        ArrayView<float> q,          // (B, Tq, H, D)
        ArrayView<float> k,          // (B, Tk, Hkv, D)
        ArrayView<float> v,          // (B, Tk, Hkv, D)
        ArrayView<float> o,          // (B, Tq, H, D)
        ArrayView<float> lse,        // (B, Tq, H)
        ArrayView<float> partialO,   // (splits, B, Tq, H, D), unused with one split
        ArrayView<float> partialLse, // (splits, B, Tq, H), unused with one split
        AttentionShape s,
        int chunk)                   // keys per split, a multiple of Keys
    {
        var kTile = SharedMemory.Allocate<float>(Keys * MaxD);
        var vTile = SharedMemory.Allocate<float>(Keys * MaxD);
        var qRow = LocalMemory.Allocate<float>(MaxD);
        var acc = LocalMemory.Allocate<float>(MaxD);
        var scores = LocalMemory.Allocate<float>(Keys);

        int t = Group.IdxX;
        int g = s.Group;
        int r = Grid.IdxX * Rows + t;
        int b = Grid.IdxY / s.Hkv;
        int hk = Grid.IdxY % s.Hkv;
        int z = Grid.IdxZ;
        bool active = r < s.Tq * g;
        int i = active ? s.RowQuery(r) : 0;
        int h = s.RowHead(hk, active ? r : 0);
        int qi = s.QIndex(b, i, h);
        int visible = active ? s.VisibleKeys(i) : 0;
        int firstKey = active ? s.FirstKey(i) : 0;
        for (int d = 0; d < s.D; d++)
        {
            qRow[d] = active ? q[qi + d] * s.Scale : 0f;
            acc[d] = 0f;
        }

        float max = float.NegativeInfinity;
        float sum = 0f;
        int j0 = z * chunk;
        int j1 = XMath.Min(s.Tk, j0 + chunk);
        for (int kt = j0; kt < j1; kt += Keys)
        {
            int nk = XMath.Min(Keys, j1 - kt);
            LoadKeyTile(k, v, kTile, vTile, s, b, hk, kt, nk, t);
            Group.Barrier();
            int seen = XMath.Min(nk, visible - kt); // keys of this tile the row sees: [from, seen) (causal, sliding window)
            int from = XMath.Max(0, firstKey - kt);
            if (seen > from)
            {
                float tileMax = float.NegativeInfinity;
                for (int jj = from; jj < seen; jj++)
                {
                    float dot = 0f;
                    for (int d = 0; d < s.D; d++) dot += qRow[d] * kTile[jj * MaxD + d];
                    scores[jj] = dot;
                    tileMax = XMath.Max(tileMax, dot);
                }

                float newMax = XMath.Max(max, tileMax);
                float correction = XMath.Exp(max - newMax); // exp(-inf) = 0 on the first tile
                sum *= correction;
                for (int d = 0; d < s.D; d++) acc[d] *= correction;
                for (int jj = from; jj < seen; jj++)
                {
                    float p = XMath.Exp(scores[jj] - newMax);
                    sum += p;
                    for (int d = 0; d < s.D; d++) acc[d] += p * vTile[jj * MaxD + d];
                }

                max = newMax;
            }

            Group.Barrier();
        }

        if (!active) return;
        int li = s.LseIndex(b, h, i);
        bool single = Grid.DimZ == 1;
        var outO = single ? o : partialO;
        int oi = single ? qi : (z * s.B * s.Tq * s.H + li) * s.D;
        float inv = sum > 0f ? 1f / sum : 0f;
        for (int d = 0; d < s.D; d++) outO[oi + d] = acc[d] * inv;
        float l = sum > 0f ? max + XMath.Log(sum) : float.NegativeInfinity;
        if (single) lse[li] = l;
        else partialLse[z * s.B * s.Tq * s.H + li] = l;
    }

    /// <summary>
    /// Keys kt .. kt + nk of (b, hk) and their values into the group's tiles (row jj at jj * MaxD), the group's threads
    /// taking consecutive elements so the reads coalesce; the caller then waits at a barrier.
    /// </summary>
    private static void LoadKeyTile(
        ArrayView<float> k, ArrayView<float> v, ArrayView<float> kTile, ArrayView<float> vTile, AttentionShape s, int b, int hk, int kt, int nk, int thread)
    {
        for (int e = thread; e < nk * s.D; e += Rows)
        {
            int jj = e / s.D;
            int d = e - jj * s.D;
            int src = s.KIndex(b, kt + jj, hk) + d;
            kTile[jj * MaxD + d] = k[src];
            vTile[jj * MaxD + d] = v[src];
        }
    }

    /// <summary>
    /// o and lse of each row from its splits' partial results: o = sum_z e^(l_z - m) o_z / sum_z e^(l_z - m),
    /// lse = m + log sum_z e^(l_z - m), m = max_z l_z; a row no split saw gets o = 0 and lse = -inf. One thread per row.
    /// </summary>
    public static void MergeSplitsKernel(
        Index1D row,                 // over B * Tq * H (lse order, which is o's row order)
        ArrayView<float> partialO,   // (splits, rows, D)
        ArrayView<float> partialLse, // (splits, rows)
        ArrayView<float> o,          // (rows, D)
        ArrayView<float> lse,        // (rows)
        int rows,
        int splits,
        int dim)
    {
        float m = float.NegativeInfinity;
        for (int z = 0; z < splits; z++) m = XMath.Max(m, partialLse[z * rows + row]);
        int oi = row * dim;
        if (m == float.NegativeInfinity)
        {
            for (int d = 0; d < dim; d++) o[oi + d] = 0f;
            lse[row] = float.NegativeInfinity;
            return;
        }

        float total = 0f;
        for (int d = 0; d < dim; d++) o[oi + d] = 0f;
        for (int z = 0; z < splits; z++)
        {
            float w = XMath.Exp(partialLse[z * rows + row] - m); // 0 for a split that saw no key
            total += w;
            int pi = (z * rows + row) * dim;
            for (int d = 0; d < dim; d++) o[oi + d] += w * partialO[pi + d];
        }

        float inv = 1f / total;
        for (int d = 0; d < dim; d++) o[oi + d] *= inv;
        lse[row] = m + XMath.Log(total);
    }

    /// <summary>
    /// dq with the forward's tiles: grid (ceil(Tq G / Rows), B Hkv, 1), groups (Rows, 1, 1), one thread per query row of
    /// one (b, hk), each tile of keys and values loaded into shared memory once for the group's rows; probabilities
    /// recomputed from lse, delta from <see cref="AttentionKernels.DeltaKernel"/>.
    /// </summary>
    public static void BackwardQueryKernel(
        ArrayView<float> q,     // (B, Tq, H, D)
        ArrayView<float> k,     // (B, Tk, Hkv, D)
        ArrayView<float> v,     // (B, Tk, Hkv, D)
        ArrayView<float> lse,   // (B, Tq, H)
        ArrayView<float> delta, // (B, Tq, H)
        ArrayView<float> dO,    // (B, Tq, H, D)
        ArrayView<float> dq,    // (B, Tq, H, D)
        AttentionShape s)
    {
        var kTile = SharedMemory.Allocate<float>(Keys * MaxD);
        var vTile = SharedMemory.Allocate<float>(Keys * MaxD);
        var qRow = LocalMemory.Allocate<float>(MaxD);
        var dORow = LocalMemory.Allocate<float>(MaxD);
        var acc = LocalMemory.Allocate<float>(MaxD);

        int t = Group.IdxX;
        int g = s.Group;
        int r = Grid.IdxX * Rows + t;
        int b = Grid.IdxY / s.Hkv;
        int hk = Grid.IdxY % s.Hkv;
        bool active = r < s.Tq * g;
        int i = active ? s.RowQuery(r) : 0;
        int h = s.RowHead(hk, active ? r : 0);
        int qi = s.QIndex(b, i, h);
        int li = s.LseIndex(b, h, i);
        int visible = active ? s.VisibleKeys(i) : 0;
        int firstKey = active ? s.FirstKey(i) : 0;
        float l = active ? lse[li] : 0f;
        float dl = active ? delta[li] : 0f;
        for (int d = 0; d < s.D; d++)
        {
            qRow[d] = active ? q[qi + d] : 0f;
            dORow[d] = active ? dO[qi + d] : 0f;
            acc[d] = 0f;
        }

        for (int kt = 0; kt < s.Tk; kt += Keys)
        {
            int nk = XMath.Min(Keys, s.Tk - kt);
            LoadKeyTile(k, v, kTile, vTile, s, b, hk, kt, nk, t);
            Group.Barrier();
            int seen = XMath.Min(nk, visible - kt);
            for (int jj = XMath.Max(0, firstKey - kt); jj < seen; jj++)
            {
                float dot = 0f, dp = 0f;
                for (int d = 0; d < s.D; d++)
                {
                    dot += qRow[d] * kTile[jj * MaxD + d];
                    dp += dORow[d] * vTile[jj * MaxD + d];
                }

                float ds = XMath.Exp(dot * s.Scale - l) * (dp - dl) * s.Scale;
                for (int d = 0; d < s.D; d++) acc[d] += ds * kTile[jj * MaxD + d];
            }

            Group.Barrier();
        }

        if (!active) return;
        for (int d = 0; d < s.D; d++) dq[qi + d] = acc[d];
    }

    /// <summary>
    /// dk and dv: grid (ceil(Tk / Rows), B Hkv, 1), groups (Rows, 1, 1), one thread per key row (b, j, hk); the group
    /// walks the Tq G query rows of its key/value head (<see cref="AttentionShape.RowQuery"/>) in tiles of Rows,
    /// loading each tile's q, dO, lse and delta into shared memory once for all its keys.
    /// </summary>
    public static void BackwardKeyValueKernel(
        ArrayView<float> q,     // (B, Tq, H, D)
        ArrayView<float> k,     // (B, Tk, Hkv, D)
        ArrayView<float> v,     // (B, Tk, Hkv, D)
        ArrayView<float> lse,   // (B, Tq, H)
        ArrayView<float> delta, // (B, Tq, H)
        ArrayView<float> dO,    // (B, Tq, H, D)
        ArrayView<float> dk,    // (B, Tk, Hkv, D)
        ArrayView<float> dv,    // (B, Tk, Hkv, D)
        AttentionShape s)
    {
        var qTile = SharedMemory.Allocate<float>(Rows * MaxD);
        var dOTile = SharedMemory.Allocate<float>(Rows * MaxD);
        var lseTile = SharedMemory.Allocate<float>(Rows);
        var deltaTile = SharedMemory.Allocate<float>(Rows);
        var kRow = LocalMemory.Allocate<float>(MaxD);
        var vRow = LocalMemory.Allocate<float>(MaxD);
        var dkAcc = LocalMemory.Allocate<float>(MaxD);
        var dvAcc = LocalMemory.Allocate<float>(MaxD);

        int t = Group.IdxX;
        int g = s.Group;
        int j = Grid.IdxX * Rows + t;
        int b = Grid.IdxY / s.Hkv;
        int hk = Grid.IdxY % s.Hkv;
        bool active = j < s.Tk;
        int kj = s.KIndex(b, active ? j : 0, hk);
        for (int d = 0; d < s.D; d++)
        {
            kRow[d] = active ? k[kj + d] : 0f;
            vRow[d] = active ? v[kj + d] : 0f;
            dkAcc[d] = 0f;
            dvAcc[d] = 0f;
        }

        int rows = s.Tq * g;
        for (int rt = 0; rt < rows; rt += Rows)
        {
            int nr = XMath.Min(Rows, rows - rt);
            for (int e = t; e < nr * s.D; e += Rows)
            {
                int rr = e / s.D;
                int d = e - rr * s.D;
                int row = rt + rr;
                int src = s.QIndex(b, s.RowQuery(row), s.RowHead(hk, row)) + d;
                qTile[rr * MaxD + d] = q[src];
                dOTile[rr * MaxD + d] = dO[src];
            }

            if (t < nr)
            {
                int row = rt + t;
                int li = s.LseIndex(b, s.RowHead(hk, row), s.RowQuery(row));
                lseTile[t] = lse[li];
                deltaTile[t] = delta[li];
            }

            Group.Barrier();
            if (active)
            {
                for (int rr = 0; rr < nr; rr++)
                {
                    int query = s.RowQuery(rt + rr);
                    if (j >= s.VisibleKeys(query) || j < s.FirstKey(query)) continue; // causal or windowed: this query does not see key j
                    float dot = 0f, dp = 0f;
                    for (int d = 0; d < s.D; d++)
                    {
                        dot += qTile[rr * MaxD + d] * kRow[d];
                        dp += dOTile[rr * MaxD + d] * vRow[d];
                    }

                    float p = XMath.Exp(dot * s.Scale - lseTile[rr]);
                    float ds = p * (dp - deltaTile[rr]) * s.Scale;
                    for (int d = 0; d < s.D; d++)
                    {
                        dkAcc[d] += ds * qTile[rr * MaxD + d];
                        dvAcc[d] += p * dOTile[rr * MaxD + d];
                    }
                }
            }

            Group.Barrier();
        }

        if (!active) return;
        for (int d = 0; d < s.D; d++)
        {
            dk[kj + d] = dkAcc[d];
            dv[kj + d] = dvAcc[d];
        }
    }
}
