using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using PeftSharp.Kernels.BitDelta;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// The CPU 1-bit product: for each variant's rows (up to four at a time, sharing every decoded word) and each output
/// feature, sum_k +-x[k] over the packed words. A byte of sign bits selects one of 256 precomputed 8-lane masks
/// that flip x's sign bit where S = -1, so each weight costs one bit of memory traffic and one XOR and add.
/// </summary>
internal static unsafe class BitDeltaCpu
{
    /// <summary>Lane j of mask b is -0.0 (flip the sign) where bit j of b is 0 (S = -1), +0.0 where it is 1.</summary>
    private static readonly Vector256<float>[] Flip = Enumerable.Range(0, 256)
        .Select(b => Vector256.Create(Enumerable.Range(0, 8).Select(j => ((b >> j) & 1) != 0 ? 0f : -0f).ToArray()))
        .ToArray();

    public static void Mixed(
        float[] x, int xo,           // (M, K)
        float[] y, int yo,           // (M, N)
        int[] signs,                 // (slots, N, W)
        float[] scales, int so,      // (slots)
        int[] first, int[] rounds,   // (variants)
        int[] rowVariant,            // (M)
        BitDeltaShape s)
    {
        var groups = CpuDevice.RowsByIndex(rowVariant, first.Length);

        // Work items: (variant, block of up to four rows, range of output features), spread over the cores.
        var items = new List<(int V, int[] Rows, int N0, int N1)>();
        int tasksWanted = Math.Max(1, Environment.ProcessorCount * 4);
        for (int v = 0; v < groups.Length; v++)
        {
            var rows = groups[v];
            for (int r = 0; r < rows.Length; r += 4)
            {
                var block = rows.Skip(r).Take(4).ToArray();
                int chunk = Math.Max(16, (s.N + tasksWanted - 1) / tasksWanted);
                for (int n0 = 0; n0 < s.N; n0 += chunk) items.Add((v, block, n0, Math.Min(s.N, n0 + chunk)));
            }
        }

        void Run(int t)
        {
            var (v, block, n0, n1) = items[t];
            fixed (float* px = x, py = y, ps = scales)
            fixed (int* pw = signs)
            {
                Block(px + xo, py + yo, pw, ps + so, first[v], rounds[v], block, n0, n1, s);
            }
        }

        long work = (long)items.Count * s.K * 4;
        if (items.Count > 1 && work > 1 << 16) Parallel.For(0, items.Count, Run);
        else for (int t = 0; t < items.Count; t++) Run(t);
    }

    /// <summary>Row counts as types, so the JIT compiles one <see cref="Block{TRows}"/> per count without dead lanes.</summary>
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

    private static void Block(float* x, float* y, int* signs, float* scales, int firstSlot, int rounds, int[] rows, int n0, int n1, BitDeltaShape s)
    {
        int done = 0;
        while (done < rows.Length)
        {
            int left = rows.Length - done;
            if (left >= 4) Block<Four>(x, y, signs, scales, firstSlot, rounds, rows, done, n0, n1, s);
            else if (left >= 2) Block<Two>(x, y, signs, scales, firstSlot, rounds, rows, done, n0, n1, s);
            else Block<One>(x, y, signs, scales, firstSlot, rounds, rows, done, n0, n1, s);
            done += left >= 4 ? 4 : left >= 2 ? 2 : 1;
        }
    }

    /// <summary>TRows.Count rows from rows[r0], output features [n0, n1): every decoded mask is applied to each row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Block<TRows>(float* x, float* y, int* signs, float* scales, int firstSlot, int rounds, int[] rows, int r0, int n0, int n1, BitDeltaShape s)
        where TRows : struct, IRows
    {
        int k = s.K, w = s.W, m = TRows.Count;
        float* x0 = x + (long)rows[r0] * k;
        float* x1 = m > 1 ? x + (long)rows[r0 + 1] * k : x0;
        float* x2 = m > 2 ? x + (long)rows[r0 + 2] * k : x0;
        float* x3 = m > 3 ? x + (long)rows[r0 + 3] * k : x0;
        int chunks = Vector256.IsHardwareAccelerated ? k / 8 : 0;
        int fullWords = chunks / 4;
        fixed (Vector256<float>* flip = Flip)
        {
            for (int n = n0; n < n1; n++)
            {
                float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
                for (int j = firstSlot; j < firstSlot + rounds; j++)
                {
                    int* words = signs + ((long)j * s.N + n) * w;
                    // One accumulator chain per row is latency-bound (a vector add every ~4 cycles), so a single row
                    // keeps four chains (one per byte of the word) and two rows keep two each; four rows are four.
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
                        uint word = (uint)words[wi];
                        var m0 = flip[word & 255];
                        var m1 = flip[(word >> 8) & 255];
                        var m2 = flip[(word >> 16) & 255];
                        var m3 = flip[word >> 24];
                        float* p0 = x0 + (wi << 5);
                        if (m == 1)
                        {
                            a0 += Vector256.Xor(Vector256.Load(p0), m0);
                            b0 += Vector256.Xor(Vector256.Load(p0 + 8), m1);
                            c0 += Vector256.Xor(Vector256.Load(p0 + 16), m2);
                            d0 += Vector256.Xor(Vector256.Load(p0 + 24), m3);
                        }
                        else if (m == 2)
                        {
                            float* p1 = x1 + (wi << 5);
                            a0 += Vector256.Xor(Vector256.Load(p0), m0);
                            b0 += Vector256.Xor(Vector256.Load(p0 + 8), m1);
                            a1 += Vector256.Xor(Vector256.Load(p1), m0);
                            b1 += Vector256.Xor(Vector256.Load(p1 + 8), m1);
                            a0 += Vector256.Xor(Vector256.Load(p0 + 16), m2);
                            b0 += Vector256.Xor(Vector256.Load(p0 + 24), m3);
                            a1 += Vector256.Xor(Vector256.Load(p1 + 16), m2);
                            b1 += Vector256.Xor(Vector256.Load(p1 + 24), m3);
                        }
                        else
                        {
                            int o = wi << 5;
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
                        var mask = flip[(words[c >> 2] >> ((c & 3) << 3)) & 255];
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
                        bool plus = ((words[c >> 5] >> (c & 31)) & 1) != 0;
                        r0s += plus ? x0[c] : -x0[c];
                        if (m > 1) r1s += plus ? x1[c] : -x1[c];
                        if (m > 2) r2s += plus ? x2[c] : -x2[c];
                        if (m > 3) r3s += plus ? x3[c] : -x3[c];
                    }

                    float a = scales[j];
                    t0 += a * r0s;
                    t1 += a * r1s;
                    t2 += a * r2s;
                    t3 += a * r3s;
                }

                y[(long)rows[r0] * s.N + n] += t0;
                if (m > 1) y[(long)rows[r0 + 1] * s.N + n] += t1;
                if (m > 2) y[(long)rows[r0 + 2] * s.N + n] += t2;
                if (m > 3) y[(long)rows[r0 + 3] * s.N + n] += t3;
            }
        }
    }

    /// <summary>dense (N, K) = beta * dense + alpha * S for one slot.</summary>
    public static void Decode(int[] signs, int slot, float[] dense, int offset, float alpha, float beta, BitDeltaShape s)
    {
        int k = s.K, w = s.W;
        CpuDevice.ForRows(s.N, k, n =>
        {
            int wo = (slot * s.N + n) * w;
            var row = dense.AsSpan(offset + n * k, k);
            for (int c = 0; c < k; c++)
            {
                float v = ((signs[wo + (c >> 5)] >> (c & 31)) & 1) != 0 ? alpha : -alpha;
                row[c] = beta == 0f ? v : beta * row[c] + v;
            }
        });
    }
}
