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
        var groups = new Dictionary<int, List<int>>();
        for (int i = 0; i < s.M; i++)
        {
            int v = rowVariant[i];
            if (v >= 0)
            {
                if (!groups.TryGetValue(v, out var rows)) groups[v] = rows = new List<int>();
                rows.Add(i);
            }
        }

        // Work items: (variant, block of up to four rows, range of output features), spread over the cores.
        var items = new List<(int V, int[] Rows, int N0, int N1)>();
        int tasksWanted = Math.Max(1, Environment.ProcessorCount * 4);
        foreach (var (v, rows) in groups)
        {
            for (int r = 0; r < rows.Count; r += 4)
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

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Block(float* x, float* y, int* signs, float* scales, int firstSlot, int rounds, int[] rows, int n0, int n1, BitDeltaShape s)
    {
        int k = s.K, w = s.W, m = rows.Length;
        float* x0 = x + rows[0] * k;
        float* x1 = x + rows[m > 1 ? 1 : 0] * k;
        float* x2 = x + rows[m > 2 ? 2 : 0] * k;
        float* x3 = x + rows[m > 3 ? 3 : 0] * k;
        int chunks = Vector256.IsHardwareAccelerated ? k / 8 : 0;
        for (int n = n0; n < n1; n++)
        {
            float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
            for (int j = firstSlot; j < firstSlot + rounds; j++)
            {
                int* words = signs + ((long)j * s.N + n) * w;
                var a0 = Vector256<float>.Zero;
                var a1 = Vector256<float>.Zero;
                var a2 = Vector256<float>.Zero;
                var a3 = Vector256<float>.Zero;
                for (int c = 0; c < chunks; c++)
                {
                    var mask = Flip[(words[c >> 2] >> ((c & 3) << 3)) & 255];
                    int o = c << 3;
                    a0 += Vector256.Xor(Vector256.Load(x0 + o), mask);
                    a1 += Vector256.Xor(Vector256.Load(x1 + o), mask);
                    a2 += Vector256.Xor(Vector256.Load(x2 + o), mask);
                    a3 += Vector256.Xor(Vector256.Load(x3 + o), mask);
                }

                float r0 = Vector256.Sum(a0), r1 = Vector256.Sum(a1), r2 = Vector256.Sum(a2), r3 = Vector256.Sum(a3);
                for (int c = chunks * 8; c < k; c++)
                {
                    bool plus = ((words[c >> 5] >> (c & 31)) & 1) != 0;
                    r0 += plus ? x0[c] : -x0[c];
                    r1 += plus ? x1[c] : -x1[c];
                    r2 += plus ? x2[c] : -x2[c];
                    r3 += plus ? x3[c] : -x3[c];
                }

                float a = scales[j];
                t0 += a * r0;
                t1 += a * r1;
                t2 += a * r2;
                t3 += a * r3;
            }

            y[rows[0] * s.N + n] += t0;
            if (m > 1) y[rows[1] * s.N + n] += t1;
            if (m > 2) y[rows[2] * s.N + n] += t2;
            if (m > 3) y[rows[3] * s.N + n] += t3;
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
