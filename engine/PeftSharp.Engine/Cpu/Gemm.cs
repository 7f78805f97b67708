using System.Buffers;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// Single-precision GEMM for the CPU backend, BLIS-style: B is packed into NR-column panels per KC slice, A into
/// MR-row panels per MC block, and a 6 x 16 register-blocked micro-kernel (12 Vector256 accumulators, broadcast
/// FMA) computes each tile. Row blocks x column chunks run in parallel. Every transposition and leading dimension
/// is handled by the packing, so the micro-kernel only ever sees contiguous panels.
/// </summary>
internal static unsafe class Gemm
{
    public const int MR = 6;
    public const int NR = 16;
    private const int KC = 256;  // K slice: an A panel (MR x KC) and a B panel (KC x NR) stay in L1
    private const int MC = 96;   // rows per task block (16 micro-panels); MC x KC of A = 96 KiB, in L2
    private const int SmallRows = 16; // up to this many rows against a transposed B, the inner-product kernel
    private const int SmallRowsLongK = 64; // and up to this many when K >= LongK
    private const int LongK = 512;
    private const int DirectMaxN = 4 * NR; // up to this many columns A is read in place instead of packed
    private const int PackSlack = 8; // floats past a packed A block that PackA's 8-float stores may touch

    /// <summary>
    /// c = alpha * op(a) op(b) + beta * c. op(a) is (m, k): a[i * lda + p], or a[p * lda + i] when transA.
    /// op(b) is (k, n): b[p * ldb + j], or b[j * ldb + p] when transB. c[i * ldc + j]. With beta = 0 c is not read.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Sgemm(
        bool transA, bool transB, int m, int n, int k, float alpha,
        float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel = true)
    {
        if (m == 0 || n == 0) return;
        if (k == 0 || alpha == 0f)
        {
            ScaleC(m, n, beta, c, ldc);
            return;
        }

        // Few rows against a transposed b (a linear layer at decode time, or attention's Q K^T): the register-blocked
        // inner products, for 2 to 16 rows, and up to 64 (a batch of decode requests) when the dot products are long:
        // packing the (N, K) weight on every call cost more there than it saved (Stopwatch, M = 24..64, K = 512..4096:
        // 0.8-1.0x the packed path's time, 0.6x at M = 32, N = K = 4096). For 2-4 rows they took 0.5-0.75x the time of
        // one vectorised dot product per output (interleaved runs, K = 512..4096). One row stays on the dot-product
        // path: the 4 x 4 kernel would repeat it four times.
        bool inner = m > 1 && (m <= SmallRows || (m <= SmallRowsLongK && k >= LongK));
        if (inner && transB && !transA)
        {
            InnerProduct(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, parallel);
            return;
        }

        if (m <= 4 && !transA)
        {
            SmallM(transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, parallel);
            return;
        }

        int panels = (n + NR - 1) / NR;
        int kcMax = Math.Min(KC, k);
        float[] packedB = ArrayPool<float>.Shared.Rent(panels * NR * kcMax);
        try
        {
            fixed (float* bp = packedB)
            {
                float* bpp = bp;
                int rowBlocks = (m + MC - 1) / MC;
                int blockRows = ((m + rowBlocks - 1) / rowBlocks + MR - 1) / MR * MR; // balanced, a multiple of MR
                rowBlocks = (m + blockRows - 1) / blockRows;
                bool par = parallel && (long)m * n * k >= 64L * 64 * 64 && Environment.ProcessorCount > 1;
                // Each task packs its A block once, so split the columns only as far as the cores need work:
                // at least two tasks per core.
                int colChunks = par ? Math.Clamp((2 * Environment.ProcessorCount + rowBlocks - 1) / rowBlocks, 1, panels) : 1;
                int chunkCols = (panels + colChunks - 1) / colChunks * NR;
                colChunks = (n + chunkCols - 1) / chunkCols;
                int tasks = rowBlocks * colChunks;
                for (int pc = 0; pc < k; pc += KC)
                {
                    int kc = Math.Min(KC, k - pc);
                    float betaSlice = pc == 0 ? beta : 1f;
                    int pcc = pc;
                    if (par && panels > 1)
                    {
                        Parallel.For(0, panels, jp => PackB(transB, b, ldb, pcc, kc, jp * NR, Math.Min(NR, n - jp * NR), bpp + (long)jp * NR * kc));
                    }
                    else
                    {
                        for (int jp = 0; jp < panels; jp++) PackB(transB, b, ldb, pc, kc, jp * NR, Math.Min(NR, n - jp * NR), bp + (long)jp * NR * kc);
                    }

                    if (par && tasks > 1)
                    {
                        Parallel.For(0, tasks, t => RunBlock(t, colChunks, chunkCols, blockRows, transA, m, n, a, lda, pcc, kc, bpp, alpha, betaSlice, c, ldc));
                    }
                    else
                    {
                        for (int t = 0; t < tasks; t++) RunBlock(t, colChunks, chunkCols, blockRows, transA, m, n, a, lda, pc, kc, bp, alpha, betaSlice, c, ldc);
                    }
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(packedB);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RunBlock(
        int task, int colChunks, int chunkCols, int blockRows, bool transA, int m, int n, float* a, int lda, int pc, int kc, float* bp,
        float alpha, float beta, float* c, int ldc)
    {
        int ic = task / colChunks * blockRows;
        int jc = task % colChunks * chunkCols;
        int mc = Math.Min(blockRows, m - ic);
        int nc = Math.Min(chunkCols, n - jc);
        int mPanels = (mc + MR - 1) / MR;
        float[] packedA = ArrayPool<float>.Shared.Rent(mPanels * MR * kc + PackSlack);
        try
        {
            fixed (float* ap = packedA)
            {
                // With at most four column panels each A element is used by few kernel calls, and packing it cost a
                // third of the kernels' time in attention's P V and dS K products (N = head dim): read A in place.
                bool direct = n <= DirectMaxN;
                for (int ip = 0; ip < mPanels && !direct; ip++)
                {
                    PackA(transA, a, lda, ic + ip * MR, Math.Min(MR, mc - ip * MR), pc, kc, ap + ip * MR * kc);
                }

                for (int jr = 0; jr < nc; jr += NR)
                {
                    int nr = Math.Min(NR, nc - jr);
                    float* bPanel = bp + (long)(jc + jr) / NR * NR * kc;
                    for (int ip = 0; ip < mPanels; ip++)
                    {
                        int ir = ip * MR;
                        int mr = Math.Min(MR, mc - ir);
                        float* cTile = c + (long)(ic + ir) * ldc + jc + jr;
                        if (!direct) Kernel6x16(kc, ap + ip * MR * kc, bPanel, cTile, ldc, mr, nr, alpha, beta);
                        else if (transA) Kernel6x16(kc, a + (long)pc * lda + ic + ir, 1, lda, bPanel, cTile, ldc, mr, nr, alpha, beta);
                        else Kernel6x16(kc, a + (long)(ic + ir) * lda + pc, lda, 1, bPanel, cTile, ldc, mr, nr, alpha, beta);
                    }
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(packedA);
        }
    }

    /// <summary>Packs op(a)[i0 .. i0+mr, p0 .. p0+kc] as kc groups of MR floats, zero-padded past mr.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackA(bool transA, float* a, int lda, int i0, int mr, int p0, int kc, float* dst)
    {
        if (mr < MR) new Span<float>(dst, MR * kc).Clear();
        if (transA)
        {
            for (int p = 0; p < kc; p++)
            {
                float* src = a + (long)(p0 + p) * lda + i0;
                for (int r = 0; r < mr; r++) dst[p * MR + r] = src[r];
            }
        }
        else if (mr == MR && Avx.IsSupported)
        {
            // Eight k at a time: the six rows' runs transposed in registers (two zero rows), each k's six values stored
            // as one 8-float store whose two spare lanes the next store overwrites; the last spills two floats past
            // the group, overwritten by the next group, the tail, or the next panel (the buffer has slack past the end).
            float* src = a + (long)i0 * lda + p0;
            var zero = Vector256<float>.Zero;
            int p = 0;
            for (; p + 8 <= kc; p += 8)
            {
                float* s0 = src + p;
                Transpose8x8(
                    Avx.LoadVector256(s0), Avx.LoadVector256(s0 + lda), Avx.LoadVector256(s0 + 2L * lda), Avx.LoadVector256(s0 + 3L * lda),
                    Avx.LoadVector256(s0 + 4L * lda), Avx.LoadVector256(s0 + 5L * lda), zero, zero, dst + p * MR, MR);
            }

            for (; p < kc; p++)
            {
                for (int r = 0; r < MR; r++) dst[p * MR + r] = src[r * (long)lda + p];
            }
        }
        else
        {
            for (int r = 0; r < mr; r++)
            {
                float* src = a + (long)(i0 + r) * lda + p0;
                for (int p = 0; p < kc; p++) dst[p * MR + r] = src[p];
            }
        }
    }

    /// <summary>Packs op(b)[p0 .. p0+kc, j0 .. j0+nr] as kc groups of NR floats, zero-padded past nr.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackB(bool transB, float* b, int ldb, int p0, int kc, int j0, int nr, float* dst)
    {
        if (transB && nr == NR && Avx.IsSupported)
        {
            int p = 0;
            for (; p + 8 <= kc; p += 8)
            {
                Transpose8x8(b + (long)j0 * ldb + p0 + p, ldb, dst + p * NR, NR);
                Transpose8x8(b + (long)(j0 + 8) * ldb + p0 + p, ldb, dst + p * NR + 8, NR);
            }

            for (; p < kc; p++)
            {
                for (int col = 0; col < NR; col++) dst[p * NR + col] = b[(long)(j0 + col) * ldb + p0 + p];
            }
        }
        else if (transB)
        {
            if (nr < NR) new Span<float>(dst, NR * kc).Clear();
            for (int col = 0; col < nr; col++)
            {
                float* src = b + (long)(j0 + col) * ldb + p0;
                for (int p = 0; p < kc; p++) dst[p * NR + col] = src[p];
            }
        }
        else if (nr == NR)
        {
            for (int p = 0; p < kc; p++)
            {
                float* src = b + (long)(p0 + p) * ldb + j0;
                Vector256.Store(Vector256.Load(src), dst + p * NR);
                Vector256.Store(Vector256.Load(src + 8), dst + p * NR + 8);
            }
        }
        else
        {
            for (int p = 0; p < kc; p++)
            {
                float* src = b + (long)(p0 + p) * ldb + j0;
                int col = 0;
                for (; col < nr; col++) dst[p * NR + col] = src[col];
                for (; col < NR; col++) dst[p * NR + col] = 0f;
            }
        }
    }

    /// <summary>dst[q * ldd + r] = src[r * lds + q] for an 8 x 8 block: the standard unpack / shuffle / permute transpose.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose8x8(float* src, int lds, float* dst, int ldd) =>
        Transpose8x8(
            Avx.LoadVector256(src), Avx.LoadVector256(src + lds), Avx.LoadVector256(src + 2L * lds), Avx.LoadVector256(src + 3L * lds),
            Avx.LoadVector256(src + 4L * lds), Avx.LoadVector256(src + 5L * lds), Avx.LoadVector256(src + 6L * lds), Avx.LoadVector256(src + 7L * lds),
            dst, ldd);

    /// <summary>dst[q * ldd + r] = lane q of row r, q in 0..8: eight 8-float stores in increasing q.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose8x8(
        Vector256<float> r0, Vector256<float> r1, Vector256<float> r2, Vector256<float> r3,
        Vector256<float> r4, Vector256<float> r5, Vector256<float> r6, Vector256<float> r7, float* dst, int ldd)
    {
        var t0 = Avx.UnpackLow(r0, r1);
        var t1 = Avx.UnpackHigh(r0, r1);
        var t2 = Avx.UnpackLow(r2, r3);
        var t3 = Avx.UnpackHigh(r2, r3);
        var t4 = Avx.UnpackLow(r4, r5);
        var t5 = Avx.UnpackHigh(r4, r5);
        var t6 = Avx.UnpackLow(r6, r7);
        var t7 = Avx.UnpackHigh(r6, r7);
        var u0 = Avx.Shuffle(t0, t2, 0x44);
        var u1 = Avx.Shuffle(t0, t2, 0xEE);
        var u2 = Avx.Shuffle(t1, t3, 0x44);
        var u3 = Avx.Shuffle(t1, t3, 0xEE);
        var u4 = Avx.Shuffle(t4, t6, 0x44);
        var u5 = Avx.Shuffle(t4, t6, 0xEE);
        var u6 = Avx.Shuffle(t5, t7, 0x44);
        var u7 = Avx.Shuffle(t5, t7, 0xEE);
        Avx.Store(dst, Avx.Permute2x128(u0, u4, 0x20));
        Avx.Store(dst + ldd, Avx.Permute2x128(u1, u5, 0x20));
        Avx.Store(dst + 2L * ldd, Avx.Permute2x128(u2, u6, 0x20));
        Avx.Store(dst + 3L * ldd, Avx.Permute2x128(u3, u7, 0x20));
        Avx.Store(dst + 4L * ldd, Avx.Permute2x128(u0, u4, 0x31));
        Avx.Store(dst + 5L * ldd, Avx.Permute2x128(u1, u5, 0x31));
        Avx.Store(dst + 6L * ldd, Avx.Permute2x128(u2, u6, 0x31));
        Avx.Store(dst + 7L * ldd, Avx.Permute2x128(u3, u7, 0x31));
    }

    /// <summary>
    /// Few rows against a transposed b (a linear layer at decode time, b = W (N, K)): c[i, j] = a_i . W_j, computed
    /// 4 weight rows x 4 activation rows at a time with 16 vector accumulators along K. W is streamed once, unpacked;
    /// packing it would cost more than the product.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void InnerProduct(int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel)
    {
        const int rowsPerTask = 32;
        int tasks = (n + rowsPerTask - 1) / rowsPerTask;
        if (parallel && tasks > 1 && (long)m * n * k >= 1 << 18)
        {
            Parallel.For(0, tasks, t => InnerProductRows(t * rowsPerTask, Math.Min(n, (t + 1) * rowsPerTask), m, k, alpha, a, lda, b, ldb, beta, c, ldc));
        }
        else
        {
            InnerProductRows(0, n, m, k, alpha, a, lda, b, ldb, beta, c, ldc);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void InnerProductRows(int j0, int j1, int m, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc)
    {
        float* sums = stackalloc float[16];
        int kv = k & ~7;
        for (int j = j0; j < j1; j += 4)
        {
            int nj = Math.Min(4, j1 - j);
            // Rows past the end repeat the last row, so the kernel always reads valid memory; their sums are dropped.
            float* w0 = b + (long)j * ldb;
            float* w1 = b + (long)(j + Math.Min(1, nj - 1)) * ldb;
            float* w2 = b + (long)(j + Math.Min(2, nj - 1)) * ldb;
            float* w3 = b + (long)(j + Math.Min(3, nj - 1)) * ldb;
            for (int i = 0; i < m; i += 4)
            {
                int ni = Math.Min(4, m - i);
                float* x0 = a + (long)i * lda;
                float* x1 = a + (long)(i + Math.Min(1, ni - 1)) * lda;
                float* x2 = a + (long)(i + Math.Min(2, ni - 1)) * lda;
                float* x3 = a + (long)(i + Math.Min(3, ni - 1)) * lda;
                Vector256<float> s00 = default, s01 = default, s02 = default, s03 = default;
                Vector256<float> s10 = default, s11 = default, s12 = default, s13 = default;
                Vector256<float> s20 = default, s21 = default, s22 = default, s23 = default;
                Vector256<float> s30 = default, s31 = default, s32 = default, s33 = default;
                for (int p = 0; p < kv; p += 8)
                {
                    var b0 = Vector256.Load(w0 + p);
                    var b1 = Vector256.Load(w1 + p);
                    var b2 = Vector256.Load(w2 + p);
                    var b3 = Vector256.Load(w3 + p);
                    var a0 = Vector256.Load(x0 + p);
                    s00 = Vector256.FusedMultiplyAdd(a0, b0, s00);
                    s01 = Vector256.FusedMultiplyAdd(a0, b1, s01);
                    s02 = Vector256.FusedMultiplyAdd(a0, b2, s02);
                    s03 = Vector256.FusedMultiplyAdd(a0, b3, s03);
                    var a1 = Vector256.Load(x1 + p);
                    s10 = Vector256.FusedMultiplyAdd(a1, b0, s10);
                    s11 = Vector256.FusedMultiplyAdd(a1, b1, s11);
                    s12 = Vector256.FusedMultiplyAdd(a1, b2, s12);
                    s13 = Vector256.FusedMultiplyAdd(a1, b3, s13);
                    var a2 = Vector256.Load(x2 + p);
                    s20 = Vector256.FusedMultiplyAdd(a2, b0, s20);
                    s21 = Vector256.FusedMultiplyAdd(a2, b1, s21);
                    s22 = Vector256.FusedMultiplyAdd(a2, b2, s22);
                    s23 = Vector256.FusedMultiplyAdd(a2, b3, s23);
                    var a3 = Vector256.Load(x3 + p);
                    s30 = Vector256.FusedMultiplyAdd(a3, b0, s30);
                    s31 = Vector256.FusedMultiplyAdd(a3, b1, s31);
                    s32 = Vector256.FusedMultiplyAdd(a3, b2, s32);
                    s33 = Vector256.FusedMultiplyAdd(a3, b3, s33);
                }

                sums[0] = Vector256.Sum(s00); sums[1] = Vector256.Sum(s01); sums[2] = Vector256.Sum(s02); sums[3] = Vector256.Sum(s03);
                sums[4] = Vector256.Sum(s10); sums[5] = Vector256.Sum(s11); sums[6] = Vector256.Sum(s12); sums[7] = Vector256.Sum(s13);
                sums[8] = Vector256.Sum(s20); sums[9] = Vector256.Sum(s21); sums[10] = Vector256.Sum(s22); sums[11] = Vector256.Sum(s23);
                sums[12] = Vector256.Sum(s30); sums[13] = Vector256.Sum(s31); sums[14] = Vector256.Sum(s32); sums[15] = Vector256.Sum(s33);
                for (int r = 0; r < ni; r++)
                {
                    float* xr = a + (long)(i + r) * lda;
                    for (int q = 0; q < nj; q++)
                    {
                        float* wq = b + (long)(j + q) * ldb;
                        float acc = sums[r * 4 + q];
                        for (int p = kv; p < k; p++) acc += xr[p] * wq[p];
                        float* cij = c + (long)(i + r) * ldc + j + q;
                        float v = alpha * acc;
                        *cij = beta == 0f ? v : v + beta * *cij;
                    }
                }
            }
        }
    }

    /// <summary>c[0..mr, 0..nr] = alpha * (ap panel x bp panel) + beta * c. Full tiles store straight from registers.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel6x16(int kc, float* ap, float* bp, float* c, int ldc, int mr, int nr, float alpha, float beta) =>
        Kernel6x16(kc, ap, 1, MR, bp, c, ldc, mr, nr, alpha, beta);

    /// <summary>
    /// As above with A read where it lies: row r of the tile's A at a + r * rowStep, consecutive k kStep apart (a packed
    /// panel: 1 and MR; op(a) in place: lda and 1, or 1 and lda when transposed). Rows past mr re-read row 0 (their
    /// results are dropped).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel6x16(int kc, float* a, int rowStep, int kStep, float* bp, float* c, int ldc, int mr, int nr, float alpha, float beta)
    {
        // Row r of the tile is a[o_r] (row 0 repeated past mr); one pointer advances, so the loop carries two adds.
        nint o1 = mr > 1 ? rowStep : 0, o2 = mr > 2 ? 2 * (nint)rowStep : 0, o3 = mr > 3 ? 3 * (nint)rowStep : 0;
        nint o4 = mr > 4 ? 4 * (nint)rowStep : 0, o5 = mr > 5 ? 5 * (nint)rowStep : 0, step = kStep;
        Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default;
        Vector256<float> c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
        for (int p = 0; p < kc; p++)
        {
            var b0 = Vector256.Load(bp);
            var b1 = Vector256.Load(bp + 8);
            var x0 = Vector256.Create(a[0]);
            c00 = Vector256.FusedMultiplyAdd(x0, b0, c00);
            c01 = Vector256.FusedMultiplyAdd(x0, b1, c01);
            var x1 = Vector256.Create(a[o1]);
            c10 = Vector256.FusedMultiplyAdd(x1, b0, c10);
            c11 = Vector256.FusedMultiplyAdd(x1, b1, c11);
            var x2 = Vector256.Create(a[o2]);
            c20 = Vector256.FusedMultiplyAdd(x2, b0, c20);
            c21 = Vector256.FusedMultiplyAdd(x2, b1, c21);
            var x3 = Vector256.Create(a[o3]);
            c30 = Vector256.FusedMultiplyAdd(x3, b0, c30);
            c31 = Vector256.FusedMultiplyAdd(x3, b1, c31);
            var x4 = Vector256.Create(a[o4]);
            c40 = Vector256.FusedMultiplyAdd(x4, b0, c40);
            c41 = Vector256.FusedMultiplyAdd(x4, b1, c41);
            var x5 = Vector256.Create(a[o5]);
            c50 = Vector256.FusedMultiplyAdd(x5, b0, c50);
            c51 = Vector256.FusedMultiplyAdd(x5, b1, c51);
            a += step;
            bp += NR;
        }

        if (mr == MR && nr == NR)
        {
            StoreRow(c, c00, c01, alpha, beta);
            StoreRow(c + ldc, c10, c11, alpha, beta);
            StoreRow(c + 2 * ldc, c20, c21, alpha, beta);
            StoreRow(c + 3 * ldc, c30, c31, alpha, beta);
            StoreRow(c + 4 * ldc, c40, c41, alpha, beta);
            StoreRow(c + 5 * ldc, c50, c51, alpha, beta);
            return;
        }

        float* tile = stackalloc float[MR * NR];
        c00.Store(tile); c01.Store(tile + 8);
        c10.Store(tile + 16); c11.Store(tile + 24);
        c20.Store(tile + 32); c21.Store(tile + 40);
        c30.Store(tile + 48); c31.Store(tile + 56);
        c40.Store(tile + 64); c41.Store(tile + 72);
        c50.Store(tile + 80); c51.Store(tile + 88);
        for (int r = 0; r < mr; r++)
        {
            float* row = c + (long)r * ldc;
            for (int col = 0; col < nr; col++)
            {
                float v = alpha * tile[r * NR + col];
                row[col] = beta == 0f ? v : v + beta * row[col];
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreRow(float* c, Vector256<float> lo, Vector256<float> hi, float alpha, float beta)
    {
        var va = Vector256.Create(alpha);
        if (beta == 0f)
        {
            Vector256.Store(lo * va, c);
            Vector256.Store(hi * va, c + 8);
        }
        else
        {
            var vb = Vector256.Create(beta);
            Vector256.Store(Vector256.FusedMultiplyAdd(Vector256.Load(c), vb, lo * va), c);
            Vector256.Store(Vector256.FusedMultiplyAdd(Vector256.Load(c + 8), vb, hi * va), c + 8);
        }
    }

    /// <summary>
    /// A few rows (decode-time linear layers): memory-bound, so stream b once. With transB (weights stored (N, K); one
    /// row, as 2-16 rows take the inner-product kernels) each output is a dot product; otherwise each output row is a
    /// sum of scaled rows of b.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SmallM(bool transB, int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel)
    {
        const int chunk = 64;
        int chunks = (n + chunk - 1) / chunk;
        void Run(int t)
        {
            int j0 = t * chunk;
            int j1 = Math.Min(n, j0 + chunk);
            if (transB)
            {
                for (int j = j0; j < j1; j++)
                {
                    var bj = new ReadOnlySpan<float>(b + (long)j * ldb, k);
                    for (int i = 0; i < m; i++)
                    {
                        float v = alpha * TensorPrimitives.Dot(new ReadOnlySpan<float>(a + (long)i * lda, k), bj);
                        float* ci = c + (long)i * ldc + j;
                        *ci = beta == 0f ? v : v + beta * *ci;
                    }
                }
            }
            else
            {
                // 32-column blocks in registers (4 rows x 4 vectors), b read once per block for all rows.
                for (; j0 + 32 <= j1; j0 += 32) Rows4x32(m, k, alpha, a, lda, b + j0, ldb, beta, c + j0, ldc);
                int w = j1 - j0;
                if (w == 0) return;
                for (int i = 0; i < m; i++)
                {
                    var ci = new Span<float>(c + (long)i * ldc + j0, w);
                    if (beta == 0f) ci.Clear();
                    else if (beta != 1f) TensorPrimitives.Multiply(ci, beta, ci);
                    for (int p = 0; p < k; p++)
                    {
                        TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(b + (long)p * ldb + j0, w), alpha * a[(long)i * lda + p], ci, ci);
                    }
                }
            }
        }

        if (parallel && chunks > 1 && (long)n * k >= 1 << 16) Parallel.For(0, chunks, Run);
        else for (int t = 0; t < chunks; t++) Run(t);
    }

    /// <summary>c[0..m, 0..32) = alpha * a (m, k) b[.., 0..32) + beta * c, m &lt;= 4: 16 accumulators, rows past m repeat the last (dropped).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Rows4x32(int m, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc)
    {
        float* a0 = a, a1 = a + (long)Math.Min(1, m - 1) * lda, a2 = a + (long)Math.Min(2, m - 1) * lda, a3 = a + (long)Math.Min(3, m - 1) * lda;
        Vector256<float> c00 = default, c01 = default, c02 = default, c03 = default, c10 = default, c11 = default, c12 = default, c13 = default;
        Vector256<float> c20 = default, c21 = default, c22 = default, c23 = default, c30 = default, c31 = default, c32 = default, c33 = default;
        for (int p = 0; p < k; p++)
        {
            float* bp = b + (long)p * ldb;
            var b0 = Vector256.Load(bp);
            var b1 = Vector256.Load(bp + 8);
            var b2 = Vector256.Load(bp + 16);
            var b3 = Vector256.Load(bp + 24);
            var x = Vector256.Create(a0[p]);
            c00 = Vector256.FusedMultiplyAdd(x, b0, c00);
            c01 = Vector256.FusedMultiplyAdd(x, b1, c01);
            c02 = Vector256.FusedMultiplyAdd(x, b2, c02);
            c03 = Vector256.FusedMultiplyAdd(x, b3, c03);
            x = Vector256.Create(a1[p]);
            c10 = Vector256.FusedMultiplyAdd(x, b0, c10);
            c11 = Vector256.FusedMultiplyAdd(x, b1, c11);
            c12 = Vector256.FusedMultiplyAdd(x, b2, c12);
            c13 = Vector256.FusedMultiplyAdd(x, b3, c13);
            x = Vector256.Create(a2[p]);
            c20 = Vector256.FusedMultiplyAdd(x, b0, c20);
            c21 = Vector256.FusedMultiplyAdd(x, b1, c21);
            c22 = Vector256.FusedMultiplyAdd(x, b2, c22);
            c23 = Vector256.FusedMultiplyAdd(x, b3, c23);
            x = Vector256.Create(a3[p]);
            c30 = Vector256.FusedMultiplyAdd(x, b0, c30);
            c31 = Vector256.FusedMultiplyAdd(x, b1, c31);
            c32 = Vector256.FusedMultiplyAdd(x, b2, c32);
            c33 = Vector256.FusedMultiplyAdd(x, b3, c33);
        }

        Store32(c, c00, c01, c02, c03, alpha, beta);
        if (m > 1) Store32(c + ldc, c10, c11, c12, c13, alpha, beta);
        if (m > 2) Store32(c + 2L * ldc, c20, c21, c22, c23, alpha, beta);
        if (m > 3) Store32(c + 3L * ldc, c30, c31, c32, c33, alpha, beta);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store32(float* c, Vector256<float> v0, Vector256<float> v1, Vector256<float> v2, Vector256<float> v3, float alpha, float beta)
    {
        StoreRow(c, v0, v1, alpha, beta);
        StoreRow(c + 16, v2, v3, alpha, beta);
    }

    private static void ScaleC(int m, int n, float beta, float* c, int ldc)
    {
        for (int i = 0; i < m; i++)
        {
            var row = new Span<float>(c + (long)i * ldc, n);
            if (beta == 0f) row.Clear();
            else TensorPrimitives.Multiply(row, beta, row);
        }
    }
}
