using System.Buffers;
using System.Numerics.Tensors;
using PeftSharp.Kernels.Attention;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// Grouped-query attention on the CPU in query blocks: S = scale Q_blk K^T and O_blk = P V run on the packed GEMM;
/// the softmax of each (block x visible keys) strip is exact (max, exp, sum per row), so only one strip per thread
/// is ever stored, never the Tq x Tk matrix. Layouts as in <see cref="AttentionShape"/>.
/// </summary>
internal static unsafe class CpuAttention
{
    internal readonly record struct Views(
        float[] Q, int QOffset, float[] K, int KOffset, float[] V, int VOffset, float[] O, int OOffset, float[] Lse, int LseOffset);

    public static void Forward(float[] q, int qo, float[] k, int ko, float[] v, int vo, float[] o, int oo, float[] lse, int lo, AttentionShape s)
    {
        int qb = CpuDevice.AttentionBlock;
        int blocks = (s.Tq + qb - 1) / qb;
        int tasks = s.B * s.H * blocks;
        fixed (float* pq0 = q, pk0 = k, pv0 = v, po0 = o, pl0 = lse)
        {
            float* pq = pq0 + qo, pk = pk0 + ko, pv = pv0 + vo, po = po0 + oo, pl = pl0 + lo;
            void Task(int t)
            {
                int blk = t % blocks;
                int bh = t / blocks;
                int h = bh % s.H;
                int b = bh / s.H;
                int hk = h / s.Group;
                int i0 = blk * qb;
                int rows = Math.Min(qb, s.Tq - i0);
                int keys = s.VisibleKeys(i0 + rows - 1);
                int ldq = s.H * s.D;
                int ldk = s.Hkv * s.D;
                float* qBlk = pq + s.QIndex(b, i0, h);
                float* oBlk = po + s.QIndex(b, i0, h);
                if (keys == 0)
                {
                    for (int r = 0; r < rows; r++)
                    {
                        new Span<float>(oBlk + (long)r * ldq, s.D).Clear();
                        pl[s.LseIndex(b, h, i0 + r)] = float.NegativeInfinity;
                    }

                    return;
                }

                float[] strip = ArrayPool<float>.Shared.Rent(rows * keys);
                try
                {
                    fixed (float* ps = strip)
                    {
                        Gemm.Sgemm(false, true, rows, keys, s.D, s.Scale, qBlk, ldq, pk + s.KIndex(b, 0, hk), ldk, 0f, ps, keys, parallel: false);
                        for (int r = 0; r < rows; r++)
                        {
                            var row = new Span<float>(ps + (long)r * keys, keys);
                            int n = s.VisibleKeys(i0 + r);
                            pl[s.LseIndex(b, h, i0 + r)] = SoftmaxPrefix(row, n);
                        }

                        Gemm.Sgemm(false, false, rows, s.D, keys, 1f, ps, keys, pv + s.KIndex(b, 0, hk), ldk, 0f, oBlk, ldq, parallel: false);
                    }
                }
                finally
                {
                    ArrayPool<float>.Shared.Return(strip);
                }
            }

            if (tasks > 1) Parallel.For(0, tasks, Task);
            else Task(0);
        }
    }

    /// <summary>Softmax of row[0..n) in place, zeroes row[n..); returns the log-sum-exp (-inf when n = 0).</summary>
    private static float SoftmaxPrefix(Span<float> row, int n)
    {
        if (n == 0)
        {
            row.Clear();
            return float.NegativeInfinity;
        }

        var live = row[..n];
        float max = TensorPrimitives.Max(live);
        TensorPrimitives.Subtract(live, max, live);
        TensorPrimitives.Exp(live, live);
        float sum = TensorPrimitives.Sum(live);
        TensorPrimitives.Multiply(live, 1f / sum, live);
        row[n..].Clear();
        return max + MathF.Log(sum);
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
                                int keys = s.VisibleKeys(i0 + rows - 1);
                                float* qBlk = pq + s.QIndex(b, i0, h);
                                float* dOBlk = pdo + s.QIndex(b, i0, h);
                                float* dqBlk = pdq + s.QIndex(b, i0, h);
                                if (keys == 0)
                                {
                                    for (int r = 0; r < rows; r++) new Span<float>(dqBlk + (long)r * ldq, s.D).Clear();
                                    continue;
                                }

                                // P = exp(scale Q K^T - lse) on visible keys; dP = dO V^T.
                                Gemm.Sgemm(false, true, rows, keys, s.D, s.Scale, qBlk, ldq, kHead, ldk, 0f, pp, keys, innerParallel);
                                Gemm.Sgemm(false, true, rows, keys, s.D, 1f, dOBlk, ldq, vHead, ldk, 0f, pds, keys, innerParallel);
                                for (int r = 0; r < rows; r++)
                                {
                                    int i = i0 + r;
                                    int n = s.VisibleKeys(i);
                                    float l = pl[s.LseIndex(b, h, i)];
                                    var pRow = new Span<float>(pp + (long)r * keys, keys);
                                    var dsRow = new Span<float>(pds + (long)r * keys, keys);
                                    if (n == 0 || float.IsNegativeInfinity(l))
                                    {
                                        pRow.Clear();
                                        dsRow.Clear();
                                        continue;
                                    }

                                    var live = pRow[..n];
                                    TensorPrimitives.Subtract(live, l, live);
                                    TensorPrimitives.Exp(live, live);
                                    pRow[n..].Clear();
                                    float delta = TensorPrimitives.Dot(
                                        new ReadOnlySpan<float>(dOBlk + (long)r * ldq, s.D), new ReadOnlySpan<float>(po + s.QIndex(b, i, h), s.D));
                                    // dS = P * (dP - delta) * scale
                                    TensorPrimitives.Subtract(dsRow, delta, dsRow);
                                    TensorPrimitives.Multiply(dsRow, pRow, dsRow);
                                    TensorPrimitives.Multiply(dsRow, s.Scale, dsRow);
                                }

                                Gemm.Sgemm(false, false, rows, s.D, keys, 1f, pds, keys, kHead, ldk, 0f, dqBlk, ldq, innerParallel);
                                Gemm.Sgemm(true, false, keys, s.D, rows, 1f, pds, keys, qBlk, ldq, 1f, dkHead, ldk, innerParallel);
                                Gemm.Sgemm(true, false, keys, s.D, rows, 1f, pp, keys, dOBlk, ldq, 1f, dvHead, ldk, innerParallel);
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

            if (tasks > 1) Parallel.For(0, tasks, Task);
            else Task(0);
        }
    }
}
