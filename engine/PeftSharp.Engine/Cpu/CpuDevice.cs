using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// The CPU backend: managed arrays, System.Numerics.Tensors for elementwise work, the packed <see cref="Gemm"/>
/// for matmuls and attention blocks, Parallel.For over rows. The default device without a GPU.
/// </summary>
public sealed unsafe class CpuDevice : Device
{
    /// <summary>Rows per parallel task for row-wise ops: enough work to amortize scheduling.</summary>
    private const int MinElementsPerTask = 1 << 15;

    /// <summary>Query rows per attention block: a (block x Tk) score strip is all the scratch attention keeps.</summary>
    internal const int AttentionBlock = 64;

    public CpuDevice()
    {
        Info = new DeviceInfo(
            "cpu", DeviceKind.Cpu, $"CPU SIMD ({Environment.ProcessorCount} threads, {SimdDescription()})",
            GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, Vector256<float>.Count, Environment.ProcessorCount, SimdDescription());
    }

    public override DeviceInfo Info { get; }

    private static string SimdDescription() =>
        Vector512.IsHardwareAccelerated ? "AVX-512" : Vector256.IsHardwareAccelerated ? "AVX2/FMA" : Vector128.IsHardwareAccelerated ? "128-bit SIMD" : "scalar";

    private static Span<float> S(Tensor t) => ((float[])t.Storage).AsSpan(t.Offset, t.Length);

    private static float[] Arr(Tensor t) => (float[])t.Storage;

    private readonly StoragePool storage = new();

    internal override object AllocateStorage(int length) => storage.Rent(length);

    internal override object AllocateUninitializedStorage(int length) => storage.Rent(length, clear: false);

    internal override object AllocateIndexStorage(int[] values) => values;

    internal override void ReleaseStorage(object storage)
    {
        if (storage is float[] array) this.storage.Return(array);
    }

    public override long CachedBytes => storage.PooledBytes;

    /// <summary>Tensor arrays the pool could not serve from what it kept (fresh allocations of 4096 floats or more).</summary>
    internal long PoolMisses => storage.Misses;

    /// <summary>Bytes of tensors alive now, and the most alive at once, as the pool counts them.</summary>
    internal (long Live, long PeakLive) PoolLiveBytes => storage.LiveBytes;

    public override long ReleaseCachedMemory() => storage.Clear();

    protected override void DisposeCore() => storage.Clear();

    internal override void Upload(Tensor t, ReadOnlySpan<float> source) => source.CopyTo(S(t));

    internal override void Download(Tensor t, Span<float> destination) => S(t).CopyTo(destination);

    internal override void MatMulCore(Tensor a, Tensor b, Tensor c, MatMulShape s, float alpha, float beta)
    {
        fixed (float* pa = Arr(a), pb = Arr(b), pc = Arr(c))
        {
            int lda = s.TransposeA != 0 ? s.M : s.K;
            int ldb = s.TransposeB != 0 ? s.K : s.N;
            for (int bt = 0; bt < s.Batch; bt++)
            {
                Gemm.Sgemm(
                    s.TransposeA != 0, s.TransposeB != 0, s.M, s.N, s.K, alpha,
                    pa + a.Offset + (long)bt * s.StrideA, lda, pb + b.Offset + (long)bt * s.StrideB, ldb,
                    beta, pc + c.Offset + (long)bt * s.StrideC, s.N);
            }
        }
    }

    internal override void AddCore(Tensor a, Tensor b, Tensor y) => TensorPrimitives.Add(S(a), S(b), S(y));

    internal override void MulCore(Tensor a, Tensor b, Tensor y) => TensorPrimitives.Multiply(S(a), S(b), S(y));

    internal override void ScaleCore(Tensor x, float s, Tensor y) => TensorPrimitives.Multiply(S(x), s, S(y));

    internal override void ScaleColumnsCore(Tensor x, Tensor c, Tensor y, int cols)
    {
        float[] xa = Arr(x), ya = Arr(y), ca = Arr(c);
        int xo = x.Offset, yo = y.Offset, co = c.Offset;
        ForRows(x.Length / cols, cols, r => TensorPrimitives.Multiply(xa.AsSpan(xo + r * cols, cols), ca.AsSpan(co, cols), ya.AsSpan(yo + r * cols, cols)));
    }

    internal override void AxpyCore(float alpha, Tensor x, Tensor y) => TensorPrimitives.MultiplyAdd(S(x), alpha, S(y), S(y));

    internal override void FillCore(Tensor y, float value) => S(y).Fill(value);

    internal override void CopyCore(Tensor source, Tensor destination) => S(source).CopyTo(S(destination));

    internal override void TanhCore(Tensor x, Tensor y) => TensorPrimitives.Tanh(S(x), S(y));

    internal override void TanhBackwardCore(Tensor y, Tensor dy, Tensor dx)
    {
        var ys = S(y).ToArray();
        TensorPrimitives.Multiply(ys, ys, ys);
        TensorPrimitives.Subtract(1f, ys, ys);
        TensorPrimitives.Multiply(S(dy), ys, S(dx));
    }

    internal override void SiluCore(Tensor x, Tensor y)
    {
        // silu(x) = x * sigmoid(x)
        var xs = S(x);
        var ys = S(y);
        VectorExp.Sigmoid(xs, ys);
        TensorPrimitives.Multiply(xs, ys, ys);
    }

    internal override void SiluBackwardCore(Tensor x, Tensor dy, Tensor dx)
    {
        var xa = Arr(x);
        var dya = Arr(dy);
        var dxa = Arr(dx);
        int xo = x.Offset, dyo = dy.Offset, dxo = dx.Offset;
        ForChunks(x.Length, (i0, n) =>
        {
            Span<float> sig = n <= 4096 ? stackalloc float[n] : new float[n];
            var xs = xa.AsSpan(xo + i0, n);
            VectorExp.Sigmoid(xs, sig);
            var d = dxa.AsSpan(dxo + i0, n);
            var g = dya.AsSpan(dyo + i0, n);
            for (int i = 0; i < n; i++) d[i] = g[i] * sig[i] * (1f + xs[i] * (1f - sig[i]));
        });
    }

    internal override void SwiGluCore(Tensor gate, Tensor up, Tensor y)
    {
        var ga = Arr(gate);
        var ua = Arr(up);
        var ya = Arr(y);
        int go = gate.Offset, uo = up.Offset, yo = y.Offset;
        ForChunks(gate.Length, (i0, n) =>
        {
            Span<float> sig = n <= 4096 ? stackalloc float[n] : new float[n];
            var g = ga.AsSpan(go + i0, n);
            VectorExp.Sigmoid(g, sig);
            TensorPrimitives.Multiply(g, sig, sig);
            TensorPrimitives.Multiply(sig, ua.AsSpan(uo + i0, n), ya.AsSpan(yo + i0, n));
        });
    }

    internal override void LinearSwiGluCore(Tensor x, Tensor wGate, Tensor wUp, Tensor y, int m, int n, int k)
    {
        fixed (float* px = Arr(x), pg = Arr(wGate), pu = Arr(wUp), py = Arr(y))
        {
            if (Gemm.SwiGluProduct(m, n, k, px + x.Offset, k, pg + wGate.Offset, pu + wUp.Offset, k, py + y.Offset, n)) return;
        }

        base.LinearSwiGluCore(x, wGate, wUp, y, m, n, k);
    }

    internal override void SwiGluBackwardCore(Tensor gate, Tensor up, Tensor dy, Tensor dGate, Tensor dUp)
    {
        var ga = Arr(gate);
        var ua = Arr(up);
        var dya = Arr(dy);
        var dga = Arr(dGate);
        var dua = Arr(dUp);
        int go = gate.Offset, uo = up.Offset, dyo = dy.Offset, dgo = dGate.Offset, duo = dUp.Offset;
        ForChunks(gate.Length, (i0, n) =>
        {
            Span<float> sig = n <= 4096 ? stackalloc float[n] : new float[n];
            var g = ga.AsSpan(go + i0, n);
            VectorExp.Sigmoid(g, sig);
            var u = ua.AsSpan(uo + i0, n);
            var d = dya.AsSpan(dyo + i0, n);
            var dg = dga.AsSpan(dgo + i0, n);
            var du = dua.AsSpan(duo + i0, n);
            for (int i = 0; i < n; i++)
            {
                float s = sig[i];
                float gi = g[i];
                float di = d[i];
                dg[i] = di * u[i] * s * (1f + gi * (1f - s));
                du[i] = di * gi * s;
            }
        });
    }

    internal override void SoftmaxCore(Tensor x, Tensor y, int rows, int cols)
    {
        var xa = Arr(x);
        var ya = Arr(y);
        int xo = x.Offset, yo = y.Offset;
        ForRows(rows, cols, r => TensorPrimitives.SoftMax(xa.AsSpan(xo + r * cols, cols), ya.AsSpan(yo + r * cols, cols)));
    }

    internal override void SoftmaxBackwardCore(Tensor y, Tensor dy, Tensor dx, int rows, int cols)
    {
        var ya = Arr(y);
        var dya = Arr(dy);
        var dxa = Arr(dx);
        int yo = y.Offset, dyo = dy.Offset, dxo = dx.Offset;
        ForRows(rows, cols, r =>
        {
            var yr = ya.AsSpan(yo + r * cols, cols);
            var dyr = dya.AsSpan(dyo + r * cols, cols);
            var dxr = dxa.AsSpan(dxo + r * cols, cols);
            float dot = TensorPrimitives.Dot(yr, dyr);
            TensorPrimitives.Subtract(dyr, dot, dxr);
            TensorPrimitives.Multiply(dxr, yr, dxr);
        });
    }

    internal override void RmsNormCore(Tensor x, Tensor w, Tensor y, Tensor rstd, int rows, int dim, float eps)
    {
        var xa = Arr(x);
        var ya = Arr(y);
        var ra = Arr(rstd);
        var wa = Arr(w);
        int xo = x.Offset, yo = y.Offset, ro = rstd.Offset, wo = w.Offset;
        ForRows(rows, dim, r =>
        {
            var xr = xa.AsSpan(xo + r * dim, dim);
            float inv = 1f / MathF.Sqrt(TensorPrimitives.Dot(xr, xr) / dim + eps);
            ra[ro + r] = inv;
            var yr = ya.AsSpan(yo + r * dim, dim);
            TensorPrimitives.Multiply(xr, inv, yr);
            TensorPrimitives.Multiply(yr, wa.AsSpan(wo, dim), yr);
        });
    }

    internal override void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor dx, Tensor dw, int rows, int dim)
    {
        var dya = Arr(dy);
        var xa = Arr(x);
        var wa = Arr(w);
        var ra = Arr(rstd);
        var dxa = Arr(dx);
        int dyo = dy.Offset, xo = x.Offset, wo = w.Offset, ro = rstd.Offset, dxo = dx.Offset;
        ForRows(rows, dim, r =>
        {
            Span<float> wdy = dim <= 4096 ? stackalloc float[dim] : new float[dim];
            var dyr = dya.AsSpan(dyo + r * dim, dim);
            var xr = xa.AsSpan(xo + r * dim, dim);
            TensorPrimitives.Multiply(dyr, wa.AsSpan(wo, dim), wdy);
            float inv = ra[ro + r];
            float k = inv * inv * inv * TensorPrimitives.Dot(wdy, xr) / dim;
            var dxr = dxa.AsSpan(dxo + r * dim, dim);
            TensorPrimitives.Multiply(wdy, inv, dxr);
            TensorPrimitives.MultiplyAdd(xr, -k, dxr, dxr);
        });

        // dw[d] = sum_r dy[r, d] x[r, d] rstd[r]: split columns across threads, rows summed in order.
        var dwa = Arr(dw);
        int dwo = dw.Offset;
        int colChunk = Math.Max(64, (dim + Environment.ProcessorCount - 1) / Environment.ProcessorCount);
        int chunks = (dim + colChunk - 1) / colChunk;
        Cores.For(chunks, t =>
        {
            int d0 = t * colChunk;
            int n = Math.Min(colChunk, dim - d0);
            var acc = dwa.AsSpan(dwo + d0, n);
            acc.Clear();
            Span<float> tmp = n <= 4096 ? stackalloc float[n] : new float[n];
            for (int r = 0; r < rows; r++)
            {
                TensorPrimitives.Multiply(dya.AsSpan(dyo + r * dim + d0, n), xa.AsSpan(xo + r * dim + d0, n), tmp);
                TensorPrimitives.MultiplyAdd(tmp, ra[ro + r], acc, acc);
            }
        });
    }

    internal override void RopeCore(Tensor x, IndexTensor positions, Tensor y, int tokens, int heads, int dim, float theta, bool inverse, RopeScaling scaling)
    {
        var xa = Arr(x);
        var ya = Arr(y);
        int xo = x.Offset, yo = y.Offset;
        int half = dim / 2;
        var pos = positions.Host;
        int maxPosition = 0;
        for (int n = 0; n < tokens; n++) maxPosition = Math.Max(maxPosition, pos[n]);
        bool cached = RopeTable.Cacheable(maxPosition);
        var table = cached ? RopeTable.For(ref ropeTable, theta, dim, scaling, maxPosition) : RopeTable.ForTokens(theta, dim, scaling, pos, tokens);
        float sign = inverse ? -1f : 1f;
        ForRows(tokens, heads * dim, n =>
        {
            fixed (float* px = xa, py = ya, pc = table.Cos, ps = table.Sin)
            {
                long row = cached ? pos[n] : n;
                float* cos = pc + row * half, sin = ps + row * half;
                for (int h = 0; h < heads; h++)
                {
                    long o = (long)(n * heads + h) * dim;
                    RopeTable.Rotate(px + xo + o, py + yo + o, cos, sin, half, sign);
                }
            }
        });
    }

    private RopeTable? ropeTable;

    internal override void AttentionCore(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, AttentionShape s)
    {
        CpuAttention.Forward(Arr(q), q.Offset, Arr(k), k.Offset, Arr(v), v.Offset, Arr(o), o.Offset, Arr(lse), lse.Offset, s);
    }

    internal override void AttentionBackwardCore(
        Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv, AttentionShape s)
    {
        CpuAttention.Backward(
            new CpuAttention.Views(Arr(q), q.Offset, Arr(k), k.Offset, Arr(v), v.Offset, Arr(o), o.Offset, Arr(lse), lse.Offset),
            Arr(dO), dO.Offset, Arr(dq), dq.Offset, Arr(dk), dk.Offset, Arr(dv), dv.Offset, s);
    }

    internal override void EmbeddingCore(IndexTensor ids, Tensor table, Tensor y, int dim)
    {
        var ta = Arr(table);
        var ya = Arr(y);
        int to = table.Offset, yo = y.Offset;
        var idv = ids.Host;
        ForRows(idv.Length, dim, n => ta.AsSpan(to + idv[n] * dim, dim).CopyTo(ya.AsSpan(yo + n * dim, dim)));
    }

    internal override void EmbeddingBackwardCore(IndexTensor ids, Tensor dy, Tensor dtable, int dim)
    {
        // Group tokens by id (counting sort), then each used row sums its tokens in order: deterministic, parallel.
        var idv = ids.Host;
        int vocab = dtable.Dim(0);
        var (used, offsets, order) = EmbeddingPlan.Build(idv, vocab);
        var dta = Arr(dtable);
        var dya = Arr(dy);
        int dto = dtable.Offset, dyo = dy.Offset;
        S(dtable).Clear();
        ForRows(used.Length, dim * 4, u =>
        {
            var row = dta.AsSpan(dto + used[u] * dim, dim);
            for (int t = offsets[u]; t < offsets[u + 1]; t++) TensorPrimitives.Add(row, dya.AsSpan(dyo + order[t] * dim, dim), row);
        });
    }

    internal override void CrossEntropyCore(Tensor logits, IndexTensor targets, Tensor losses, int vocab, int ignoreIndex)
    {
        var la = Arr(logits);
        var loss = Arr(losses);
        int lo = logits.Offset, oo = losses.Offset;
        var tv = targets.Host;
        ForRows(tv.Length, vocab, n =>
        {
            if (tv[n] == ignoreIndex)
            {
                loss[oo + n] = 0f;
                return;
            }

            var row = la.AsSpan(lo + n * vocab, vocab);
            loss[oo + n] = LogSumExp(row) - row[tv[n]];
        });
    }

    internal override void CrossEntropyBackwardCore(Tensor logits, IndexTensor targets, Tensor dlogits, int vocab, int ignoreIndex, float scale)
    {
        var la = Arr(logits);
        var da = Arr(dlogits);
        int lo = logits.Offset, dof = dlogits.Offset;
        var tv = targets.Host;
        ForRows(tv.Length, vocab, n =>
        {
            var d = da.AsSpan(dof + n * vocab, vocab);
            if (tv[n] == ignoreIndex)
            {
                d.Clear();
                return;
            }

            TensorPrimitives.SoftMax(la.AsSpan(lo + n * vocab, vocab), d);
            d[tv[n]] -= 1f;
            if (scale != 1f) TensorPrimitives.Multiply(d, scale, d);
        });
    }

    private static float LogSumExp(ReadOnlySpan<float> row)
    {
        float max = TensorPrimitives.Max(row);
        if (float.IsNegativeInfinity(max)) return max;
        double sum = 0;
        foreach (float v in row) sum += MathF.Exp(v - max);
        return max + (float)Math.Log(sum);
    }

    internal override void AdamWCore(Tensor p, Tensor g, Tensor m, Tensor v, AdamWStep step)
    {
        var pa = Arr(p);
        var ga = Arr(g);
        var ma = Arr(m);
        var va = Arr(v);
        int po = p.Offset, go = g.Offset, mo = m.Offset, vo = v.Offset;
        float lr = step.LearningRate, b1 = step.Beta1, b2 = step.Beta2, eps = step.Epsilon;
        float decay = 1f - lr * step.WeightDecay;
        float bc1 = step.BiasCorrection1, bc2 = step.BiasCorrection2;
        ForChunks(p.Length, (i0, n) =>
        {
            var ps = pa.AsSpan(po + i0, n);
            var gs = ga.AsSpan(go + i0, n);
            var ms = ma.AsSpan(mo + i0, n);
            var vs = va.AsSpan(vo + i0, n);
            for (int i = 0; i < n; i++)
            {
                float gi = gs[i];
                float mi = b1 * ms[i] + (1f - b1) * gi;
                float vi = b2 * vs[i] + (1f - b2) * gi * gi;
                ms[i] = mi;
                vs[i] = vi;
                ps[i] = ps[i] * decay - lr * (mi / bc1) / (MathF.Sqrt(vi / bc2) + eps);
            }
        });
    }

    internal override void SgdCore(Tensor p, Tensor g, Tensor? momentum, SgdStep step)
    {
        var pa = Arr(p);
        var ga = Arr(g);
        var ba = momentum == null ? null : Arr(momentum);
        int po = p.Offset, go = g.Offset, bo = momentum?.Offset ?? 0;
        ForChunks(p.Length, (i0, n) =>
        {
            var ps = pa.AsSpan(po + i0, n);
            var gs = ga.AsSpan(go + i0, n);
            for (int i = 0; i < n; i++)
            {
                float gi = gs[i] + step.WeightDecay * ps[i];
                if (step.Momentum != 0f)
                {
                    float bi = step.Momentum * ba![bo + i0 + i] + gi;
                    ba[bo + i0 + i] = bi;
                    gi = step.Nesterov ? gi + step.Momentum * bi : bi;
                }

                ps[i] -= step.LearningRate * gi;
            }
        });
    }

    internal override double SumCore(Tensor x, bool squares)
    {
        // Fixed-size chunks summed in float, then in double in chunk order: the same answer on every run.
        var xa = Arr(x);
        int xo = x.Offset;
        int chunks = (x.Length + ElementwiseKernels.ReduceChunk - 1) / ElementwiseKernels.ReduceChunk;
        var partial = new double[chunks];
        ForRows(chunks, ElementwiseKernels.ReduceChunk, c =>
        {
            int i0 = c * ElementwiseKernels.ReduceChunk;
            var span = xa.AsSpan(xo + i0, Math.Min(ElementwiseKernels.ReduceChunk, x.Length - i0));
            partial[c] = squares ? TensorPrimitives.Dot(span, span) : TensorPrimitives.Sum(span);
        });
        double acc = 0;
        foreach (double v in partial) acc += v;
        return acc;
    }

    internal override void DoraScaleCore(Tensor y, Tensor scales, IndexTensor rowSlots, int n)
    {
        float[] ya = Arr(y), sa = Arr(scales);
        int yo = y.Offset, so = scales.Offset;
        var slots = rowSlots.Host;
        for (int i = 0; i < slots.Length; i++)
        {
            if (slots[i] < 0) continue;
            var row = ya.AsSpan(yo + i * n, n);
            TensorPrimitives.Multiply(row, sa.AsSpan(so + slots[i] * n, n), row);
        }
    }

    /// <summary>Rows grouped by adapter, as the forward: per group T = X A^T, dB += s dY^T T, dT = s dY B, dA += dT^T X, dX += dT A.</summary>
    internal override void LoraMixedBackwardCore(Tensor x, Tensor dy, LoraAdapterPool pool, IndexTensor rowAdapters, Tensor? dx, Tensor da, Tensor db, LoraBatchShape s)
    {
        var groups = RowsByIndex(rowAdapters.Host, pool.Count);
        float[] xa = Arr(x), dya = Arr(dy), aPool = Arr(pool.APool), bPool = Arr(pool.BPool), daa = Arr(da), dba = Arr(db);
        float[]? dxa = dx == null ? null : Arr(dx);
        int xo = x.Offset, dyo = dy.Offset, apo = pool.APool.Offset, bpo = pool.BPool.Offset, dao = da.Offset, dbo = db.Offset, dxo = dx?.Offset ?? 0;
        for (int a = 0; a < pool.Count; a++)
        {
            var rows = groups[a];
            if (rows.Length == 0) continue;
            int m = rows.Length, r = pool.RanksHost[a];
            float scale = pool.ScalesHost[a];
            var xs = new float[m * s.K];
            var gs = new float[m * s.N];
            for (int j = 0; j < m; j++)
            {
                xa.AsSpan(xo + rows[j] * s.K, s.K).CopyTo(xs.AsSpan(j * s.K, s.K));
                dya.AsSpan(dyo + rows[j] * s.N, s.N).CopyTo(gs.AsSpan(j * s.N, s.N));
            }

            var t = new float[m * r];
            var dt = new float[m * r];
            var dxs = new float[m * s.K];
            fixed (float* px = xs, pg = gs, pt = t, pdt = dt, pdx = dxs, pa = aPool, pb = bPool, pda = daa, pdb = dba)
            {
                float* aOf = pa + apo + pool.AOffsetsHost[a], bOf = pb + bpo + pool.BOffsetsHost[a];
                Gemm.Sgemm(false, true, m, r, s.K, 1f, px, s.K, aOf, s.K, 0f, pt, r, true);                                   // T = X A^T
                Gemm.Sgemm(true, false, s.N, r, m, scale, pg, s.N, pt, r, 1f, pdb + dbo + pool.BOffsetsHost[a], r, true);     // dB += s dY^T T
                Gemm.Sgemm(false, false, m, r, s.N, scale, pg, s.N, bOf, r, 0f, pdt, r, true);                                // dT = s dY B
                Gemm.Sgemm(true, false, r, s.K, m, 1f, pdt, r, px, s.K, 1f, pda + dao + pool.AOffsetsHost[a], s.K, true);      // dA += dT^T X
                Gemm.Sgemm(false, false, m, s.K, r, 1f, pdt, r, aOf, s.K, 0f, pdx, s.K, true);                                // dX = dT A
            }

            if (dxa == null) continue;
            for (int j = 0; j < m; j++)
            {
                var row = dxa.AsSpan(dxo + rows[j] * s.K, s.K);
                TensorPrimitives.Add(row, dxs.AsSpan(j * s.K, s.K), row);
            }
        }
    }

    internal override void MaskedAdamWCore(Tensor p, Tensor g, IndexTensor idx, Tensor m, Tensor v, AdamWStep step)
    {
        float[] pa = Arr(p), ga = Arr(g), ma = Arr(m), va = Arr(v);
        int po = p.Offset, go = g.Offset, mo = m.Offset, vo = v.Offset;
        var ix = idx.Host;
        float lr = step.LearningRate, b1 = step.Beta1, b2 = step.Beta2, eps = step.Epsilon, bc1 = step.BiasCorrection1, bc2 = step.BiasCorrection2;
        float decay = 1f - lr * step.WeightDecay;
        ForRows(ix.Length, 1, j =>
        {
            int i = ix[j];
            float gi = ga[go + i];
            float mi = b1 * ma[mo + j] + (1f - b1) * gi;
            float vi = b2 * va[vo + j] + (1f - b2) * gi * gi;
            ma[mo + j] = mi;
            va[vo + j] = vi;
            pa[po + i] = pa[po + i] * decay - lr * (mi / bc1) / (MathF.Sqrt(vi / bc2) + eps);
        });
    }

    internal override void MaskedSgdCore(Tensor p, Tensor g, IndexTensor idx, Tensor? momentum, SgdStep step)
    {
        float[] pa = Arr(p), ga = Arr(g);
        float[]? ba = momentum == null ? null : Arr(momentum);
        int po = p.Offset, go = g.Offset, bo = momentum?.Offset ?? 0;
        var ix = idx.Host;
        ForRows(ix.Length, 1, j =>
        {
            int i = ix[j];
            float gi = ga[go + i] + step.WeightDecay * pa[po + i];
            if (step.Momentum != 0f)
            {
                float bi = step.Momentum * ba![bo + j] + gi;
                ba[bo + j] = bi;
                gi = bi;
            }

            pa[po + i] -= step.LearningRate * gi;
        });
    }

    internal override void ScatterAddCore(Tensor w, IndexTensor idx, Tensor values, float alpha)
    {
        float[] wa = Arr(w), va = Arr(values);
        int wo = w.Offset, vo = values.Offset;
        var ix = idx.Host;
        for (int j = 0; j < ix.Length; j++) wa[wo + ix[j]] += alpha * va[vo + j];
    }

    internal override void ScatterCore(Tensor w, IndexTensor idx, Tensor values)
    {
        float[] wa = Arr(w), va = Arr(values);
        int wo = w.Offset, vo = values.Offset;
        var ix = idx.Host;
        for (int j = 0; j < ix.Length; j++) wa[wo + ix[j]] = va[vo + j];
    }

    internal override void GatherCore(Tensor w, IndexTensor idx, Tensor values)
    {
        float[] wa = Arr(w), va = Arr(values);
        int wo = w.Offset, vo = values.Offset;
        var ix = idx.Host;
        for (int j = 0; j < ix.Length; j++) va[vo + j] = wa[wo + ix[j]];
    }

    internal override void DareCore(Tensor x, Tensor y, float p, int seed)
    {
        float[] xa = Arr(x), ya = Arr(y);
        int xo = x.Offset, yo = y.Offset;
        ForRows(x.Length, 1, i => ya[yo + i] = PeftSharp.Kernels.Sparse.SparseKernels.Uniform(seed, i) >= p ? (p == 0f ? xa[xo + i] : xa[xo + i] / (1f - p)) : 0f);
    }

    internal override void AbsAddCore(Tensor x, Tensor acc)
    {
        float[] xa = Arr(x), aa = Arr(acc);
        int xo = x.Offset, ao = acc.Offset;
        ForRows(x.Length, 1, i => aa[ao + i] += MathF.Abs(xa[xo + i]));
    }

    /// <summary>The sort key of entry i (as <see cref="SelectKernels.Key"/>).</summary>
    private static uint SelectKey(float[] xa, int xo, int i, SelectScore score) =>
        score.Mode == SelectScore.Uniform
            ? BitConverter.SingleToUInt32Bits(PeftSharp.Kernels.Sparse.SparseKernels.Uniform(score.Seed, i))
            : BitConverter.SingleToUInt32Bits(xa[xo + i]) & 0x7FFFFFFFu;

    internal override int[] SelectHistogramCore(Tensor x, SelectScore score, uint prefix, uint prefixMask, int shift, int chunk)
    {
        float[] xa = Arr(x);
        int xo = x.Offset, n = x.Length, chunks = (n + chunk - 1) / chunk;
        var total = new int[SelectKernels.Bins];
        Parallel.For(0, chunks, Cores.Options, () => new int[SelectKernels.Bins], (c, _, hist) =>
        {
            int end = Math.Min(n, (c + 1) * chunk);
            for (int i = c * chunk; i < end; i++)
            {
                uint key = SelectKey(xa, xo, i, score);
                if ((key & prefixMask) == prefix) hist[(key >> shift) & 0xFF]++;
            }

            return hist;
        }, hist =>
        {
            lock (total)
            {
                for (int b = 0; b < total.Length; b++) total[b] += hist[b];
            }
        });
        return total;
    }

    internal override int[] SelectWriteCore(Tensor x, SelectScore score, SelectBand band, int count)
    {
        float[] xa = Arr(x);
        int xo = x.Offset, chunks = (band.Length + band.Chunk - 1) / band.Chunk;
        var counts = new int[3 * chunks];
        Cores.For(chunks, c =>
        {
            int end = Math.Min(band.Length, (c + 1) * band.Chunk);
            for (int i = c * band.Chunk; i < end; i++)
            {
                uint key = SelectKey(xa, xo, i, score);
                if (key == band.KeyLo) counts[3 * c]++;
                if (key == band.KeyHi) counts[3 * c + 1]++;
                if (key > band.KeyHi && key < band.KeyLo) counts[3 * c + 2]++;
            }
        });
        var before = SelectPlan.Before(counts, band, count);
        var output = new int[count];
        Cores.For(chunks, c =>
        {
            int posLo = before[3 * c], posHi = before[3 * c + 1], at = before[3 * c + 2];
            int end = Math.Min(band.Length, (c + 1) * band.Chunk);
            for (int i = c * band.Chunk; i < end; i++)
            {
                uint key = SelectKey(xa, xo, i, score);
                bool keep = key > band.KeyHi && key < band.KeyLo;
                if (key == band.KeyLo || key == band.KeyHi)
                {
                    keep = true;
                    if (key == band.KeyLo) keep = posLo++ >= band.LoStart;
                    if (key == band.KeyHi) keep = keep && posHi++ < band.HiEnd;
                }

                if (keep) output[at++] = i;
            }
        });
        return output;
    }

    internal override void SparseDeltaMixedCore(Tensor x, Tensor y, SparseDeltaPool pool, IndexTensor rowVariants, int rows)
    {
        float[] xa = Arr(x), ya = Arr(y), vals = Arr(pool.Vals);
        int xo = x.Offset, yo = y.Offset, n = pool.OutFeatures, k = pool.InFeatures;
        var rs = pool.RowStartHost;
        var cols = pool.Cols.Host;
        var rv = rowVariants.Host;
        ForRows(rows, n, r =>
        {
            int v = rv[r];
            if (v < 0) return;
            var xr = xa.AsSpan(xo + r * k, k);
            for (int o = 0; o < n; o++)
            {
                int at = v * (n + 1) + o;
                float acc = 0f;
                for (int e = rs[at]; e < rs[at + 1]; e++) acc += vals[e] * xr[cols[e]];
                ya[yo + r * n + o] += acc;
            }
        });
    }

    internal override void AttentionMergeCore(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2, Tensor o, Tensor lse, int rows, int d)
    {
        float[] a1 = Arr(o1), a2 = Arr(o2), ao = Arr(o), l1a = Arr(lse1), l2a = Arr(lse2), la = Arr(lse);
        int p1 = o1.Offset, p2 = o2.Offset, po = o.Offset, q1 = lse1.Offset, q2 = lse2.Offset, ql = lse.Offset;
        ForRows(rows, d, r =>
        {
            float l1 = l1a[q1 + r], l2 = l2a[q2 + r];
            var dst = ao.AsSpan(po + r * d, d);
            if (float.IsNegativeInfinity(l2))
            {
                if (float.IsNegativeInfinity(l1)) dst.Clear();
                else a1.AsSpan(p1 + r * d, d).CopyTo(dst);
                la[ql + r] = l1;
                return;
            }

            if (float.IsNegativeInfinity(l1))
            {
                a2.AsSpan(p2 + r * d, d).CopyTo(dst);
                la[ql + r] = l2;
                return;
            }

            float m = MathF.Max(l1, l2), e1 = MathF.Exp(l1 - m), e2 = MathF.Exp(l2 - m), inv = 1f / (e1 + e2);
            TensorPrimitives.Multiply(a1.AsSpan(p1 + r * d, d), e1 * inv, dst);
            TensorPrimitives.MultiplyAdd(a2.AsSpan(p2 + r * d, d), e2 * inv, dst, dst);
            la[ql + r] = m + MathF.Log(e1 + e2);
        });
    }

    internal override int[] ArrangeBitDeltaWords(int[] words, int outFeatures, int wordsPerRow) =>
        BitDeltaCpu.Arrange(words, outFeatures, wordsPerRow);

    internal override void BitDeltaMixedCore(Tensor x, Tensor y, BitDeltaPool pool, IndexTensor rowVariants, BitDeltaShape s) =>
        BitDeltaCpu.Mixed(Arr(x), x.Offset, Arr(y), y.Offset, pool.Signs.Host, Arr(pool.Scales), pool.Scales.Offset, pool.FirstHost, pool.RoundsHost, rowVariants.Host, s);

    internal override void BitDeltaDecodeCore(BitDeltaPool pool, int slot, Tensor dense, float alpha, float beta, BitDeltaShape s) =>
        BitDeltaCpu.Decode(pool.Signs.Host, slot, Arr(dense), dense.Offset, alpha, beta, s);

    /// <summary>
    /// Rows grouped by adapter (SGMV): for each adapter, gather its rows, t = X_a A_a^T and d = s t B_a^T through the
    /// packed GEMM, then add d into those rows of y. Groups run in parallel; each group's rows are its own.
    /// </summary>
    internal override void LoraMixedCore(Tensor x, Tensor y, LoraAdapterPool pool, IndexTensor rowAdapters, LoraBatchShape s)
    {
        var groups = RowsByIndex(rowAdapters.Host, pool.Count);

        var xa = Arr(x);
        var ya = Arr(y);
        var aPool = Arr(pool.APool);
        var bt = pool.BTransposedHost(Arr(pool.BPool), pool.BPool.Offset);
        int xo = x.Offset, yo = y.Offset, apo = pool.APool.Offset;
        var work = Enumerable.Range(0, pool.Count).Where(a => groups[a].Length > 0).ToArray();
        bool inner = work.Length == 1;
        void Group(int a)
        {
            var rows = groups[a];
            int m = rows.Length, r = pool.RanksHost[a];
            // Rows in one run (a single request, or an adapter's requests side by side) are read from x and added into
            // y where they lie; scattered rows are gathered, and their products added back row by row.
            bool run = rows[m - 1] - rows[0] == m - 1;
            float[]? xs = null, d = null;
            if (!run)
            {
                xs = new float[m * s.K];
                for (int j = 0; j < m; j++) xa.AsSpan(xo + rows[j] * s.K, s.K).CopyTo(xs.AsSpan(j * s.K, s.K));
                d = new float[m * s.N];
            }

            var t = new float[m * r];
            fixed (float* px = xa, pxs = xs, py = ya, pd = d, pt = t, pa = aPool, pb = bt)
            {
                float* xIn = run ? px + xo + (long)rows[0] * s.K : pxs;
                float* dOut = run ? py + yo + (long)rows[0] * s.N : pd;
                Gemm.Sgemm(false, true, m, r, s.K, 1f, xIn, s.K, pa + apo + pool.AOffsetsHost[a], s.K, 0f, pt, r, inner);
                // t (m, r) B^T as a sum of r scaled rows of B^T (r, N) per row: K = r is too short for dot products.
                Gemm.Sgemm(false, false, m, s.N, r, pool.ScalesHost[a], pt, r, pb + pool.BOffsetsHost[a], s.N, run ? 1f : 0f, dOut, s.N, inner);
            }

            if (run) return;
            for (int j = 0; j < m; j++)
            {
                var row = ya.AsSpan(yo + rows[j] * s.N, s.N);
                TensorPrimitives.Add(row, d.AsSpan(j * s.N, s.N), row);
            }
        }

        // On the backend's own workers, like the base product before it: with .NET's pool here, the base product's
        // worker spun on one core (1 ms, waiting for the next loop) while pool threads ran the groups, and the mixed
        // batch cost 1.25-1.38x the base product at rank 8-16 instead of 1.06-1.18x (BenchmarkDotNet, 2026-12-04).
        if (work.Length > 1) Cores.For(work.Length, w => Group(work[w]));
        else foreach (int a in work) Group(a);
    }

    /// <summary>The rows that name each index in [0, count) (index -1: none), in row order: the groups of a mixed batch.</summary>
    internal static int[][] RowsByIndex(int[] ids, int count)
    {
        var lists = new List<int>[count];
        for (int i = 0; i < ids.Length; i++)
        {
            if (ids[i] >= 0) (lists[ids[i]] ??= new List<int>()).Add(i);
        }

        return lists.Select(l => l?.ToArray() ?? Array.Empty<int>()).ToArray();
    }

    /// <summary>Runs body(row) for every row, in parallel when the rows hold enough work.</summary>
    internal static void ForRows(int rows, int elementsPerRow, Action<int> body)
    {
        long work = (long)rows * Math.Max(elementsPerRow, 1);
        if (rows > 1 && work >= 2 * MinElementsPerTask && Environment.ProcessorCount > 1)
        {
            int rowsPerTask = (int)Math.Max(1, MinElementsPerTask / Math.Max(elementsPerRow, 1));
            int tasks = (rows + rowsPerTask - 1) / rowsPerTask;
            Cores.For(tasks, t =>
            {
                int end = Math.Min(rows, (t + 1) * rowsPerTask);
                for (int r = t * rowsPerTask; r < end; r++) body(r);
            });
        }
        else
        {
            for (int r = 0; r < rows; r++) body(r);
        }
    }

    /// <summary>Runs body(start, count) over [0, length) in chunks of at most 4096 elements.</summary>
    private static void ForChunks(int length, Action<int, int> body)
    {
        const int chunk = 4096;
        int chunks = (length + chunk - 1) / chunk;
        ForRows(chunks, chunk, c => body(c * chunk, Math.Min(chunk, length - c * chunk)));
    }
}

/// <summary>Tokens grouped by id (a counting sort in CSR form), for deterministic scatter-adds without atomics.</summary>
internal static class EmbeddingPlan
{
    /// <returns>used: the distinct ids in increasing order; offsets (used + 1); order: token indices grouped by id.</returns>
    public static (int[] Used, int[] Offsets, int[] Order) Build(int[] ids, int vocab)
    {
        var counts = new int[vocab];
        foreach (int id in ids) counts[id]++;
        var start = new int[vocab];
        var used = new List<int>();
        int total = 0;
        for (int v = 0; v < vocab; v++)
        {
            start[v] = total;
            total += counts[v];
            if (counts[v] > 0) used.Add(v);
        }

        var offsets = new int[used.Count + 1];
        for (int u = 0; u < used.Count; u++) offsets[u] = start[used[u]];
        offsets[used.Count] = total;
        var order = new int[ids.Length];
        var fill = (int[])start.Clone();
        for (int n = 0; n < ids.Length; n++) order[fill[ids[n]]++] = n;
        return (used.ToArray(), offsets, order);
    }
}
