using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PeftSharp.Kernels.BitDelta;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// The CPU 1-bit product y[m, n] += sum_j a_j sum_k S_j[n, k] x[m, k], two ways.
/// <para>
/// Lookup tables (AVX-512): for each row and each group of 4 inputs, the 16 sums of the group's subsets, one 512-bit
/// register. A 4-bit nibble of a sign word then selects the sum of that group's x where S = +1, for 16 output features
/// at once (one permute per 4 x 16 weights), so P[n] = sum over S = +1 of x costs ~3 vector operations per 64 weights
/// and S x = 2 P - sum(x). The pool keeps its words in tiles of 16 output features (<see cref="Arrange"/>) so one
/// aligned load gives the 16 features' words.
/// </para>
/// <para>
/// Sign masks (any SIMD width, and the N % 16 features past the last whole tile): a byte of sign bits selects one of
/// 256 precomputed 8-lane masks that flip x's sign bit where S = -1: one XOR and one add per 8 weights.
/// </para>
/// </summary>
internal static unsafe class BitDeltaCpu
{
    /// <summary>Output features per tile of the pool layout.</summary>
    public const int Tile = 16;

    /// <summary>Tables for at most this many bytes are built at once; larger batches go in chunks of rows.</summary>
    private const long TableBudget = 8L << 20;

    /// <summary>Lane j of mask b is -0.0 (flip the sign) where bit j of b is 0 (S = -1), +0.0 where it is 1.</summary>
    private static readonly Vector256<float>[] Flip = Enumerable.Range(0, 256)
        .Select(b => Vector256.Create(Enumerable.Range(0, 8).Select(j => ((b >> j) & 1) != 0 ? 0f : -0f).ToArray()))
        .ToArray();

    /// <summary>
    /// Pool layout of each slot, from the format's (N, W) row-major words: the first N - N % 16 features as tiles
    /// (N / 16, W, 16), word w of feature n at (n / 16, w, n % 16); the remaining N % 16 features row-major after them.
    /// Same word count, so a pool costs exactly what the format says.
    /// </summary>
    public static int[] Arrange(int[] words, int n, int w)
    {
        long slot = (long)n * w;
        if (slot == 0) return words;
        var result = new int[words.Length];
        for (long s = 0; s < words.Length; s += slot)
        {
            for (int f = 0; f < n; f++)
            {
                for (int c = 0; c < w; c++) result[s + WordIndex(f, c, n, w)] = words[s + (long)f * w + c];
            }
        }

        return result;
    }

    /// <summary>Index of word c of feature f within a slot of <see cref="Arrange"/>'s layout.</summary>
    public static long WordIndex(int f, int c, int n, int w)
    {
        int full = n / Tile * Tile;
        long first = f < full ? (long)(f / Tile) * w * Tile + f % Tile : (long)full * w + (long)(f - full) * w;
        return first + (long)c * WordStride(f, n);
    }

    /// <summary>Distance between consecutive words of feature f: a tile's width inside the tiles, 1 in the tail.</summary>
    public static int WordStride(int f, int n) => f < n / Tile * Tile ? Tile : 1;

    public static void Mixed(
        float[] x, int xo,           // (M, K)
        float[] y, int yo,           // (M, N)
        int[] signs,                 // (slots, N, W) in Arrange's layout
        float[] scales, int so,      // (slots)
        int[] first, int[] rounds,   // (variants)
        int[] rowVariant,            // (M)
        BitDeltaShape s,
        bool allowTables = true)     // false: every feature by sign masks (tests cover that path on AVX-512 machines)
    {
        // Rows in variant order, so a block of up to four consecutive rows shares its variant's words.
        var groups = CpuDevice.RowsByIndex(rowVariant, first.Length);
        var order = groups.SelectMany(g => g).ToArray();
        bool tables = allowTables && Avx512F.IsSupported && s.N >= Tile && order.Length > 0;
        long tableFloats = (long)s.W * 32 * Tile / 4; // W words x 8 nibbles x 16 entries
        int chunkRows = tables ? (int)Math.Clamp(TableBudget / (tableFloats * 4), 4, int.MaxValue) : order.Length;
        // Native memory: the tables must not move between the pass that builds them and the passes that read them.
        float* table = tables ? (float*)NativeMemory.AlignedAlloc((nuint)(Math.Min(chunkRows, order.Length) * tableFloats * 4), 64) : null;
        var totals = new float[order.Length];
        try
        {
            for (int c0 = 0; c0 < order.Length; c0 += chunkRows)
            {
                int c1 = Math.Min(order.Length, c0 + chunkRows);
                if (tables)
                {
                    CpuDevice.ForRows(c1 - c0, s.K * 4, i =>
                    {
                        fixed (float* px = x)
                        {
                            totals[c0 + i] = BuildTable(px + xo + (long)order[c0 + i] * s.K, table + i * tableFloats, s.K, s.W);
                        }
                    });
                }

                // Work items: blocks of up to four same-variant rows, times ranges of tiles (plus the row-major tail).
                var blocks = new List<(int V, int Start, int Count)>();
                for (int i = c0; i < c1;)
                {
                    int v = rowVariant[order[i]], j = i;
                    while (j < c1 && j - i < 4 && rowVariant[order[j]] == v) j++;
                    blocks.Add((v, i, j - i));
                    i = j;
                }

                int tiles = s.N / Tile + (s.N % Tile > 0 ? 1 : 0);
                int splits = Math.Clamp(Environment.ProcessorCount * 4 / Math.Max(1, blocks.Count), 1, tiles);
                int per = (tiles + splits - 1) / splits;
                int items = blocks.Count * splits;
                int first0 = c0;
                void Run(int t)
                {
                    var (v, start, count) = blocks[t / splits];
                    int t0 = t % splits * per, t1 = Math.Min(tiles, t0 + per);
                    if (t0 >= t1) return;
                    fixed (float* px = x, py = y, ps = scales, ptot = totals)
                    fixed (int* pw = signs, po = order)
                    {
                        var b = new RowBlock(px + xo, py + yo, po + start, count, tables ? table + (start - first0) * tableFloats : null, ptot + start, tableFloats);
                        Block(b, pw, ps + so, first[v], rounds[v], t0, t1, s);
                    }
                }

                long work = (long)(c1 - c0) * s.N * s.W;
                if (items > 1 && work > 1 << 14) Cores.For(items, Run);
                else for (int t = 0; t < items; t++) Run(t);
            }
        }
        finally
        {
            if (table != null) NativeMemory.AlignedFree(table);
        }
    }

    /// <summary>The rows of one work item: pointers into x and y, their tables and sums of x.</summary>
    private readonly struct RowBlock(float* x, float* y, int* rows, int count, float* tables, float* totals, long tableFloats)
    {
        public readonly float* X = x, Y = y, Tables = tables, Totals = totals;
        public readonly int* Rows = rows;
        public readonly int Count = count;
        public readonly long TableFloats = tableFloats;
    }

    /// <summary>
    /// table[(c * 8 + g) * 16 + i] = sum over bits b of i of x[32 c + 4 g + b] (0 past K), one 16-entry table per group
    /// of 4 inputs; returns sum(x).
    /// </summary>
    private static float BuildTable(float* x, float* table, int k, int w)
    {
        var b0 = Vector512.Create(0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1).AsSingle();
        var b1 = Vector512.Create(0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1).AsSingle();
        var b2 = Vector512.Create(0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1).AsSingle();
        var b3 = Vector512.Create(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1).AsSingle();
        int groups = w * 8, whole = k / 4;
        double total = 0;
        for (int g = 0; g < groups; g++)
        {
            float v0, v1, v2, v3;
            if (g < whole)
            {
                v0 = x[4 * g];
                v1 = x[4 * g + 1];
                v2 = x[4 * g + 2];
                v3 = x[4 * g + 3];
            }
            else
            {
                v0 = 4 * g < k ? x[4 * g] : 0;
                v1 = 4 * g + 1 < k ? x[4 * g + 1] : 0;
                v2 = 4 * g + 2 < k ? x[4 * g + 2] : 0;
                v3 = 4 * g + 3 < k ? x[4 * g + 3] : 0;
            }

            total += (double)v0 + v1 + v2 + v3;
            var t = ((b0 & Vector512.Create(v0)) + (b1 & Vector512.Create(v1))) + ((b2 & Vector512.Create(v2)) + (b3 & Vector512.Create(v3)));
            t.Store(table + 16 * g);
        }

        return (float)total;
    }

    /// <summary>Row counts as types, so the JIT compiles one kernel per count without dead lanes.</summary>
    private interface IRows
    {
        static abstract int Count { get; }
    }

    private struct One : IRows
    {
        public static int Count => 1;
    }

    private struct Two : IRows
    {
        public static int Count => 2;
    }

    private struct Four : IRows
    {
        public static int Count => 4;
    }

    /// <summary>Tiles [t0, t1) (tile N / 16 being the row-major tail when N % 16 > 0) for the block's rows.</summary>
    private static void Block(in RowBlock b, int* signs, float* scales, int firstSlot, int rounds, int t0, int t1, BitDeltaShape s)
    {
        int fullTiles = s.N / Tile;
        for (int done = 0; done < b.Count;)
        {
            int left = b.Count - done, take = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            var part = new RowBlock(b.X, b.Y, b.Rows + done, take, b.Tables == null ? null : b.Tables + done * b.TableFloats, b.Totals + done, b.TableFloats);
            for (int t = t0; t < t1; t++)
            {
                int n0 = t * Tile, n1 = Math.Min(s.N, n0 + Tile);
                for (int j = firstSlot; j < firstSlot + rounds; j++)
                {
                    int* slot = signs + (long)j * s.N * s.W;
                    float a = scales[j];
                    if (t < fullTiles && b.Tables != null)
                    {
                        int* words = slot + (long)t * s.W * Tile;
                        if (take == 4) TileLut<Four>(part, words, a, n0, s);
                        else if (take == 2) TileLut<Two>(part, words, a, n0, s);
                        else TileLut<One>(part, words, a, n0, s);
                    }
                    else
                    {
                        for (int n = n0; n < n1; n++)
                        {
                            int* words = slot + WordIndex(n, 0, s.N, s.W);
                            int stride = WordStride(n, s.N);
                            if (take == 4) FeatureMasks<Four>(part, words, stride, a, n, s);
                            else if (take == 2) FeatureMasks<Two>(part, words, stride, a, n, s);
                            else FeatureMasks<One>(part, words, stride, a, n, s);
                        }
                    }
                }
            }

            done += take;
        }
    }

    /// <summary>
    /// 16 features [n0, n0 + 16) of one slot for TRows rows: each word vector (one word per feature) is loaded once
    /// and its eight nibbles index every row's tables.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileLut<TRows>(in RowBlock b, int* words, float a, int n0, BitDeltaShape s)
        where TRows : struct, IRows
    {
        int m = TRows.Count, w = s.W;
        float* t0 = b.Tables, t1 = b.Tables + b.TableFloats, t2 = b.Tables + 2 * b.TableFloats, t3 = b.Tables + 3 * b.TableFloats;
        Vector512<float> p0 = default, p1 = default, p2 = default, p3 = default; // P for rows 0..3, first chain
        Vector512<float> q0 = default, q1 = default, q2 = default, q3 = default; // second chain
        for (int c = 0; c < w; c++)
        {
            var v = Vector512.Load((uint*)words + (long)c * Tile);
            var i0 = v.AsInt32();
            var i1 = (v >> 4).AsInt32();
            var i2 = (v >> 8).AsInt32();
            var i3 = (v >> 12).AsInt32();
            var i4 = (v >> 16).AsInt32();
            var i5 = (v >> 20).AsInt32();
            var i6 = (v >> 24).AsInt32();
            var i7 = (v >> 28).AsInt32();
            long o = (long)c * 128;
            Lookup(t0 + o, i0, i1, i2, i3, i4, i5, i6, i7, ref p0, ref q0);
            if (m > 1) Lookup(t1 + o, i0, i1, i2, i3, i4, i5, i6, i7, ref p1, ref q1);
            if (m > 2) Lookup(t2 + o, i0, i1, i2, i3, i4, i5, i6, i7, ref p2, ref q2);
            if (m > 3) Lookup(t3 + o, i0, i1, i2, i3, i4, i5, i6, i7, ref p3, ref q3);
        }

        p0 += q0;
        p1 += q1;
        p2 += q2;
        p3 += q3;

        // S x = P - (sum(x) - P) = 2 P - sum(x); y += a (2 P - sum(x)).
        Accumulate(b.Y + (long)b.Rows[0] * s.N + n0, p0, a, b.Totals[0]);
        if (m > 1) Accumulate(b.Y + (long)b.Rows[1] * s.N + n0, p1, a, b.Totals[1]);
        if (m > 2) Accumulate(b.Y + (long)b.Rows[2] * s.N + n0, p2, a, b.Totals[2]);
        if (m > 3) Accumulate(b.Y + (long)b.Rows[3] * s.N + n0, p3, a, b.Totals[3]);
    }

    /// <summary>One row's eight tables of one word (128 floats from t): each nibble index picks its group's sum; two chains.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Lookup(
        float* t, Vector512<int> i0, Vector512<int> i1, Vector512<int> i2, Vector512<int> i3, Vector512<int> i4, Vector512<int> i5, Vector512<int> i6, Vector512<int> i7,
        ref Vector512<float> p, ref Vector512<float> q)
    {
        p += Avx512F.PermuteVar16x32(Vector512.Load(t), i0) + Avx512F.PermuteVar16x32(Vector512.Load(t + 16), i1);
        q += Avx512F.PermuteVar16x32(Vector512.Load(t + 32), i2) + Avx512F.PermuteVar16x32(Vector512.Load(t + 48), i3);
        p += Avx512F.PermuteVar16x32(Vector512.Load(t + 64), i4) + Avx512F.PermuteVar16x32(Vector512.Load(t + 80), i5);
        q += Avx512F.PermuteVar16x32(Vector512.Load(t + 96), i6) + Avx512F.PermuteVar16x32(Vector512.Load(t + 112), i7);
    }

    private static void Accumulate(float* y, Vector512<float> p, float a, float total) =>
        (Vector512.Load(y) + a * (p + p - Vector512.Create(total))).Store(y);

    /// <summary>One feature n of one slot for TRows rows by sign masks; word c of the feature is words[c * stride].</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void FeatureMasks<TRows>(in RowBlock b, int* words, int stride, float a, int n, BitDeltaShape s)
        where TRows : struct, IRows
    {
        int k = s.K, m = TRows.Count;
        float* x0 = b.X + (long)b.Rows[0] * k;
        float* x1 = m > 1 ? b.X + (long)b.Rows[1] * k : x0;
        float* x2 = m > 2 ? b.X + (long)b.Rows[2] * k : x0;
        float* x3 = m > 3 ? b.X + (long)b.Rows[3] * k : x0;
        int chunks = Vector256.IsHardwareAccelerated ? k / 8 : 0;
        int fullWords = chunks / 4;
        fixed (Vector256<float>* flip = Flip)
        {
            // One accumulator chain per row is latency-bound (a vector add every ~4 cycles), so a single row keeps four
            // chains (one per byte of the word) and two rows keep two each; four rows are four.
            var a0 = Vector256<float>.Zero;
            var a1 = Vector256<float>.Zero;
            var a2 = Vector256<float>.Zero;
            var a3 = Vector256<float>.Zero;
            var b0 = Vector256<float>.Zero;
            var b1 = Vector256<float>.Zero;
            var c0 = Vector256<float>.Zero;
            var d0 = Vector256<float>.Zero;
            for (int wi = 0; wi < fullWords; wi++)
            {
                uint word = (uint)words[(long)wi * stride];
                var m0 = flip[word & 255];
                var m1 = flip[(word >> 8) & 255];
                var m2 = flip[(word >> 16) & 255];
                var m3 = flip[word >> 24];
                int o = wi << 5;
                if (m == 1)
                {
                    a0 += Vector256.Xor(Vector256.Load(x0 + o), m0);
                    b0 += Vector256.Xor(Vector256.Load(x0 + o + 8), m1);
                    c0 += Vector256.Xor(Vector256.Load(x0 + o + 16), m2);
                    d0 += Vector256.Xor(Vector256.Load(x0 + o + 24), m3);
                }
                else if (m == 2)
                {
                    a0 += Vector256.Xor(Vector256.Load(x0 + o), m0);
                    b0 += Vector256.Xor(Vector256.Load(x0 + o + 8), m1);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o), m0);
                    b1 += Vector256.Xor(Vector256.Load(x1 + o + 8), m1);
                    a0 += Vector256.Xor(Vector256.Load(x0 + o + 16), m2);
                    b0 += Vector256.Xor(Vector256.Load(x0 + o + 24), m3);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o + 16), m2);
                    b1 += Vector256.Xor(Vector256.Load(x1 + o + 24), m3);
                }
                else
                {
                    a0 += Vector256.Xor(Vector256.Load(x0 + o), m0);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o), m0);
                    a2 += Vector256.Xor(Vector256.Load(x2 + o), m0);
                    a3 += Vector256.Xor(Vector256.Load(x3 + o), m0);
                    a0 += Vector256.Xor(Vector256.Load(x0 + o + 8), m1);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o + 8), m1);
                    a2 += Vector256.Xor(Vector256.Load(x2 + o + 8), m1);
                    a3 += Vector256.Xor(Vector256.Load(x3 + o + 8), m1);
                    a0 += Vector256.Xor(Vector256.Load(x0 + o + 16), m2);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o + 16), m2);
                    a2 += Vector256.Xor(Vector256.Load(x2 + o + 16), m2);
                    a3 += Vector256.Xor(Vector256.Load(x3 + o + 16), m2);
                    a0 += Vector256.Xor(Vector256.Load(x0 + o + 24), m3);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o + 24), m3);
                    a2 += Vector256.Xor(Vector256.Load(x2 + o + 24), m3);
                    a3 += Vector256.Xor(Vector256.Load(x3 + o + 24), m3);
                }
            }

            // Leftover whole 8-lane chunks of the last, partial word.
            for (int c = fullWords * 4; c < chunks; c++)
            {
                var mask = flip[(words[(long)(c >> 2) * stride] >> ((c & 3) << 3)) & 255];
                int o = c << 3;
                a0 += Vector256.Xor(Vector256.Load(x0 + o), mask);
                if (m > 1) a1 += Vector256.Xor(Vector256.Load(x1 + o), mask);
                if (m > 2) a2 += Vector256.Xor(Vector256.Load(x2 + o), mask);
                if (m > 3) a3 += Vector256.Xor(Vector256.Load(x3 + o), mask);
            }

            float r0s = Vector256.Sum((a0 + b0) + (c0 + d0));
            float r1s = m > 1 ? Vector256.Sum(a1 + b1) : 0, r2s = m > 2 ? Vector256.Sum(a2) : 0, r3s = m > 3 ? Vector256.Sum(a3) : 0;
            for (int c = chunks * 8; c < k; c++)
            {
                bool plus = ((words[(long)(c >> 5) * stride] >> (c & 31)) & 1) != 0;
                r0s += plus ? x0[c] : -x0[c];
                if (m > 1) r1s += plus ? x1[c] : -x1[c];
                if (m > 2) r2s += plus ? x2[c] : -x2[c];
                if (m > 3) r3s += plus ? x3[c] : -x3[c];
            }

            b.Y[(long)b.Rows[0] * s.N + n] += a * r0s;
            if (m > 1) b.Y[(long)b.Rows[1] * s.N + n] += a * r1s;
            if (m > 2) b.Y[(long)b.Rows[2] * s.N + n] += a * r2s;
            if (m > 3) b.Y[(long)b.Rows[3] * s.N + n] += a * r3s;
        }
    }

    /// <summary>dense (N, K) = beta * dense + alpha * S for one slot (pool words in <see cref="Arrange"/>'s layout).</summary>
    public static void Decode(int[] signs, int slot, float[] dense, int offset, float alpha, float beta, BitDeltaShape s)
    {
        int k = s.K, w = s.W;
        long slotBase = (long)slot * s.N * w;
        CpuDevice.ForRows(s.N, k, n =>
        {
            long wo = slotBase + WordIndex(n, 0, s.N, w);
            int stride = WordStride(n, s.N);
            var row = dense.AsSpan(offset + n * k, k);
            for (int c = 0; c < k; c++)
            {
                float v = ((signs[wo + (long)(c >> 5) * stride] >> (c & 31)) & 1) != 0 ? alpha : -alpha;
                row[c] = beta == 0f ? v : beta * row[c] + v;
            }
        });
    }
}
