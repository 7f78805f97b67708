using System.Buffers;
using System.Numerics.Tensors;
using PeftSharp.Kernels.Attention;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// Grouped-query attention on the CPU in query blocks: S = scale Q_blk K^T and O_blk = P V run on the packed GEMM;
/// the softmax of each (block x visible keys) strip is exact (max, exp, sum per row), so only one strip per thread
/// is ever stored, never the Tq x Tk matrix. A block's strip spans the keys its rows see, from the first row's first
/// key (a sliding window moves it) to the last row's last; each row masks the keys outside its own range. Layouts as in
/// <see cref="AttentionShape"/>.
/// </summary>
internal static unsafe class CpuAttention
{
    internal readonly record struct Views(
        float[] Q, int QOffset, float[] K, int KOffset, float[] V, int VOffset, float[] O, int OOffset, float[] Lse, int LseOffset);

    /// <summary>
    /// One task per (sequence, key/value head, block of query positions): the G query heads that share a key/value
    /// head are packed as rows (position-major) so K and V are read once for all of them, a GEMM with G times the rows
    /// (at decode, G rows instead of G one-row products).
    /// </summary>
    public static void Forward(float[] q, int qo, float[] k, int ko, float[] v, int vo, float[] o, int oo, float[] lse, int lo, AttentionShape s)
    {
        int g = s.Group;
        int qb = Math.Max(1, CpuDevice.AttentionBlock / g); // query positions per block: about AttentionBlock rows
        int blocks = (s.Tq + qb - 1) / qb;
        int tasks = s.B * s.Hkv * blocks;
        fixed (float* pq0 = q, pk0 = k, pv0 = v, po0 = o, pl0 = lse)
        {
            float* pq = pq0 + qo, pk = pk0 + ko, pv = pv0 + vo, po = po0 + oo, pl = pl0 + lo;
            void Task(int t)
            {
                int blk = t % blocks;
                int bh = t / blocks;
                int hk = bh % s.Hkv;
                int b = bh / s.Hkv;
                int i0 = blk * qb;
                int positions = Math.Min(qb, s.Tq - i0);
                int rows = positions * g;
                int k0 = s.FirstKey(i0); // the strip's first key: the block's rows see keys k0 .. k0 + keys - 1 at most
                int keys = s.VisibleKeys(i0 + positions - 1) - k0;
                int ldk = s.Hkv * s.D;
                if (keys <= 0)
                {
                    for (int r = 0; r < positions; r++)
                    {
                        for (int j = 0; j < g; j++)
                        {
                            new Span<float>(po + s.QIndex(b, i0 + r, hk * g + j), s.D).Clear();
                            pl[s.LseIndex(b, hk * g + j, i0 + r)] = float.NegativeInfinity;
                        }
                    }

                    return;
                }

                // For one position the G heads are contiguous (stride D), so a single position needs no packing.
                bool direct = positions == 1;
                float[] packed = direct ? Array.Empty<float>() : ArrayPool<float>.Shared.Rent(2 * rows * s.D);
                float[] strip = ArrayPool<float>.Shared.Rent(rows * keys);
                try
                {
                    fixed (float* ps = strip, pp = packed)
                    {
                        float* qRows = direct ? pq + s.QIndex(b, i0, hk * g) : pp;
                        float* oRows = direct ? po + s.QIndex(b, i0, hk * g) : pp + (long)rows * s.D;
                        if (!direct)
                        {
                            for (int r = 0; r < positions; r++)
                            {
                                new ReadOnlySpan<float>(pq + s.QIndex(b, i0 + r, hk * g), g * s.D).CopyTo(new Span<float>(pp + (long)r * g * s.D, g * s.D));
                            }
                        }

                        Gemm.Sgemm(false, true, rows, keys, s.D, s.Scale, qRows, s.D, pk + s.KIndex(b, k0, hk), ldk, 0f, ps, keys, parallel: false);
                        // Softmax rows are left unnormalised, e^(s - max) (VectorExp: TensorPrimitives' exp was most of
                        // this loop); O's rows are scaled by 1 / sum after P V, D multiplies a row instead of Tk.
                        Span<float> inverse = stackalloc float[rows];
                        for (int r = 0; r < rows; r++)
                        {
                            int i = i0 + r / g;
                            float* row = ps + (long)r * keys;
                            int lo = s.FirstKey(i) - k0, n = s.VisibleKeys(i) - k0 - lo; // this row's keys: strip columns lo .. lo + n - 1
                            float max = n <= 0 ? 0f : VectorExp.Max(row + lo, n);
                            float sum = n <= 0 ? 0f : VectorExp.ExpShifted(row + lo, n, max);
                            new Span<float>(row, lo).Clear();
                            new Span<float>(row + lo + Math.Max(n, 0), keys - lo - Math.Max(n, 0)).Clear();
                            inverse[r] = n <= 0 ? 0f : 1f / sum;
                            pl[s.LseIndex(b, hk * g + r % g, i)] = n <= 0 ? float.NegativeInfinity : max + MathF.Log(sum);
                        }

                        Gemm.Sgemm(false, false, rows, s.D, keys, 1f, ps, keys, pv + s.KIndex(b, k0, hk), ldk, 0f, oRows, s.D, parallel: false);
                        for (int r = 0; r < rows; r++) TensorPrimitives.Multiply(new Span<float>(oRows + (long)r * s.D, s.D), inverse[r], new Span<float>(oRows + (long)r * s.D, s.D));
                        if (!direct)
                        {
                            for (int r = 0; r < positions; r++)
                            {
                                new ReadOnlySpan<float>(oRows + (long)r * g * s.D, g * s.D).CopyTo(new Span<float>(po + s.QIndex(b, i0 + r, hk * g), g * s.D));
                            }
                        }
                    }
                }
                finally
                {
                    ArrayPool<float>.Shared.Return(strip);
                    if (!direct) ArrayPool<float>.Shared.Return(packed);
                }
            }

            if (tasks > 1) Cores.For(tasks, Task);
            else Task(0);
        }
    }

    public static void Backward(
        Views f, float[] dO, int dOo, float[] dq, int dqo, float[] dk, int dko, float[] dv, int dvo, AttentionShape s)
    {
        int qb = CpuDevice.AttentionBlock;
        int tasks = s.B * s.Hkv;
        fixed (float* pq0 = f.Q, pk0 = f.K, pv0 = f.V, po0 = f.O, pl0 = f.Lse, pdo0 = dO, pdq0 = dq, pdk0 = dk, pdv0 = dv)
        {
            float* pq = pq0 + f.QOffset, pk = pk0 + f.KOffset, pv = pv0 + f.VOffset, po = po0 + f.OOffset, pl = pl0 + f.LseOffset;
            float* pdo = pdo0 + dOo, pdq = pdq0 + dqo, pdk = pdk0 + dko, pdv = pdv0 + dvo;
            bool innerParallel = tasks == 1;

            // One task per (b, hk): dk and dv rows of that key/value head are written by this task alone.
            void Task(int t)
            {
                int hk = t % s.Hkv;
                int b = t / s.Hkv;
                int ldq = s.H * s.D;
                int ldk = s.Hkv * s.D;
                float* kHead = pk + s.KIndex(b, 0, hk);
                float* vHead = pv + s.KIndex(b, 0, hk);
                float* dkHead = pdk + s.KIndex(b, 0, hk);
                float* dvHead = pdv + s.KIndex(b, 0, hk);
                for (int j = 0; j < s.Tk; j++)
                {
                    new Span<float>(dkHead + (long)j * ldk, s.D).Clear();
                    new Span<float>(dvHead + (long)j * ldk, s.D).Clear();
                }

                float[] pBuf = ArrayPool<float>.Shared.Rent(Math.Max(1, qb * s.Tk));
                float[] dsBuf = ArrayPool<float>.Shared.Rent(Math.Max(1, qb * s.Tk));
                try
                {
                    fixed (float* pp = pBuf, pds = dsBuf)
                    {
                        for (int g = 0; g < s.Group; g++)
                        {
                            int h = hk * s.Group + g;
                            for (int i0 = 0; i0 < s.Tq; i0 += qb)
                            {
                                int rows = Math.Min(qb, s.Tq - i0);
                                int k0 = s.FirstKey(i0);
                                int keys = s.VisibleKeys(i0 + rows - 1) - k0;
                                float* qBlk = pq + s.QIndex(b, i0, h);
                                float* dOBlk = pdo + s.QIndex(b, i0, h);
                                float* dqBlk = pdq + s.QIndex(b, i0, h);
                                float* kBlk = kHead + (long)k0 * ldk, vBlk = vHead + (long)k0 * ldk, dkBlk = dkHead + (long)k0 * ldk, dvBlk = dvHead + (long)k0 * ldk;
                                if (keys <= 0)
                                {
                                    for (int r = 0; r < rows; r++) new Span<float>(dqBlk + (long)r * ldq, s.D).Clear();
                                    continue;
                                }

                                // P = exp(scale Q K^T - lse) on visible keys; dP = dO V^T.
                                Gemm.Sgemm(false, true, rows, keys, s.D, s.Scale, qBlk, ldq, kBlk, ldk, 0f, pp, keys, innerParallel);
                                Gemm.Sgemm(false, true, rows, keys, s.D, 1f, dOBlk, ldq, vBlk, ldk, 0f, pds, keys, innerParallel);
                                for (int r = 0; r < rows; r++)
                                {
                                    int i = i0 + r;
                                    int lo = s.FirstKey(i) - k0, n = s.VisibleKeys(i) - k0; // this row's keys: strip columns lo .. n - 1
                                    float l = pl[s.LseIndex(b, h, i)];
                                    var pRow = new Span<float>(pp + (long)r * keys, keys);
                                    var dsRow = new Span<float>(pds + (long)r * keys, keys);
                                    if (n <= lo || float.IsNegativeInfinity(l))
                                    {
                                        pRow.Clear();
                                        dsRow.Clear();
                                        continue;
                                    }

                                    VectorExp.ExpShifted(pp + (long)r * keys + lo, n - lo, l);
                                    pRow[..lo].Clear();
                                    pRow[n..].Clear();
                                    float delta = TensorPrimitives.Dot(
                                        new ReadOnlySpan<float>(dOBlk + (long)r * ldq, s.D), new ReadOnlySpan<float>(po + s.QIndex(b, i, h), s.D));
                                    // dS = P * (dP - delta) * scale
                                    TensorPrimitives.Subtract(dsRow, delta, dsRow);
                                    TensorPrimitives.Multiply(dsRow, pRow, dsRow);
                                    TensorPrimitives.Multiply(dsRow, s.Scale, dsRow);
                                }

                                Gemm.Sgemm(false, false, rows, s.D, keys, 1f, pds, keys, kBlk, ldk, 0f, dqBlk, ldq, innerParallel);
                                Gemm.Sgemm(true, false, keys, s.D, rows, 1f, pds, keys, qBlk, ldq, 1f, dkBlk, ldk, innerParallel);
                                Gemm.Sgemm(true, false, keys, s.D, rows, 1f, pp, keys, dOBlk, ldq, 1f, dvBlk, ldk, innerParallel);
                            }
                        }
                    }
                }
                finally
                {
                    ArrayPool<float>.Shared.Return(pBuf);
                    ArrayPool<float>.Shared.Return(dsBuf);
                }
            }

            if (tasks > 1) Cores.For(tasks, Task);
            else Task(0);
        }
    }
}
