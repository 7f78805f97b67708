using System.Buffers;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// Single-precision GEMM for the CPU backend. With AVX-512 (<see cref="Wide"/>): one operand packed into K-major panels
/// of 32 columns, the other read in place and broadcast, 8 x 32 tiles in 16 Vector512 accumulators. Without it,
/// BLIS-style: B is packed into NR-column panels per KC slice, A into MR-row panels per MC block, and a 6 x 16
/// register-blocked micro-kernel (12 Vector256 accumulators, broadcast FMA) computes each tile. Row blocks x column
/// chunks run in parallel. Few rows take inner-product or streaming kernels on both.
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
    private const int WideKC = 1024; // K slice of the AVX-512 path: 256 packed columns x 1024 = 1 MiB, the L2
    private const int MaxWidePack = 1 << 26; // floats (256 MiB) the wide path may pack at once
    private const int SmallWidePack = 1 << 16; // floats (256 KiB) of packing that pays off from 16 rows
    private const int ShortDot = 64; // one-row dot products shorter than this run inline (ShortDots)
    private const int WBlock = 64; // broadcast rows per task of the AVX-512 path
    private const int WideMC = 256; // packed columns per task of the AVX-512 path (a multiple of 32)

    /// <summary>
    /// c = alpha * op(a) op(b) + beta * c. op(a) is (m, k): a[i * lda + p], or a[p * lda + i] when transA.
    /// op(b) is (k, n): b[p * ldb + j], or b[j * ldb + p] when transB. c[i * ldc + j]. With beta = 0 c is not read.
    /// allowWide = false keeps to the AVX2 kernels and 256-bit vectors (what a CPU without AVX-512 runs), for tests.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Sgemm(
        bool transA, bool transB, int m, int n, int k, float alpha,
        float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel = true, bool allowWide = true)
    {
        if (m == 0 || n == 0) return;
        if (k == 0 || alpha == 0f)
        {
            ScaleC(m, n, beta, c, ldc);
            return;
        }

        // With AVX-512 the 8 x 32 broadcast kernel takes everything but the fewest rows: against a transposed b from 8
        // rows (and 128 columns: below that, packing the rows costs more than the product), otherwise past 64 rows
        // (fewer rows against a row-major b would pack all of b for a few rows' use). Stopwatch, interleaved, 2 cores:
        // M = 16..64 against 2048 x 2048 weights 1.2-1.4x faster than the inner products; 256..1024-row products
        // 1.15-1.4x faster than the 6 x 16 path (medians; best runs 190-210 GFLOP/s against 150-170).
        // The wide path packs one whole operand (K x Q, Q = m for c^T = W x^T, else n); past MaxWidePack floats the
        // blocked path, which packs a slice at a time, keeps memory bounded.
        // A packed operand of up to 64K floats (an attention block's K or V, 256 KiB, in L2) is cheap to pack, so from 16
        // rows the wide path takes any product: attention's 64-row blocks (QK^T against 32-128 keys, PV with K = keys)
        // ran 10-20% faster than on the 6 x 16 path, the 20M model's attention 15-25% (Stopwatch, interleaved).
        // From 8 rows (was 12): the 180M model's decode step at batch 8 took 57-66 ms against 81-89 ms on the 4 x 4
        // inner products (two runs each of `scale phase decode 180M`, weights streamed from memory), its 128,256-row
        // head 13.7 against 20.9 ms (`gemm raw 8 128256 576`); at 2-4 rows the two were within 5%, so those keep the dots.
        bool transposed = transB && !transA && m <= n;
        long widePack = (long)k * (((transposed ? m : n) + 15) & ~15);
        if (allowWide && Avx512F.IsSupported && ((m >= 16 && widePack <= SmallWidePack) || (transB && !transA ? m >= 8 && n >= 128 : m > 64))
            && widePack <= MaxWidePack)
        {
            Wide(transA, transB, transposed, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, parallel);
            return;
        }

        bool inner = m > 1 && (m <= SmallRows || (m <= SmallRowsLongK && k >= LongK));
        if (inner && transB && !transA)
        {
            InnerProduct(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, parallel, allowWide && Avx512F.IsSupported);
            return;
        }

        if (m <= 4 && !transA)
        {
            SmallM(transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, parallel, allowWide && Vector512.IsHardwareAccelerated);
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
                    if (!transB)
                    {
                        // Row-major b: whole rows into every panel, so each row of b is read once, in order. Panel by
                        // panel read 64 bytes of each of kc rows 4 * ldb apart (a page per row at ldb = 2048), which
                        // made x W (the backward's dX = dY W) run at 0.58x of x W^T on AVX2 (128 x 2048 x 2048).
                        const int rowsPerTask = 16;
                        int rowTasks = (kc + rowsPerTask - 1) / rowsPerTask;
                        if (par && rowTasks > 1) Cores.For(rowTasks, t => PackBRows(b, ldb, pcc, kc, t * rowsPerTask, Math.Min(kc, (t + 1) * rowsPerTask), n, bpp));
                        else PackBRows(b, ldb, pc, kc, 0, kc, n, bp);
                    }
                    else if (par && panels > 1)
                    {
                        Cores.For(panels, jp => PackB(transB, b, ldb, pcc, kc, jp * NR, Math.Min(NR, n - jp * NR), bpp + (long)jp * NR * kc));
                    }
                    else
                    {
                        for (int jp = 0; jp < panels; jp++) PackB(transB, b, ldb, pc, kc, jp * NR, Math.Min(NR, n - jp * NR), bp + (long)jp * NR * kc);
                    }

                    if (par && tasks > 1)
                    {
                        Cores.For(tasks, t => RunBlock(t, colChunks, chunkCols, blockRows, transA, m, n, a, lda, pcc, kc, bpp, alpha, betaSlice, c, ldc));
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

    /// <summary>
    /// y (m, n) = silu(x wGate^T) * (x wUp^T), the Llama MLP's gate and up projections and their SwiGLU in one pass:
    /// x (m, k) row-major with leading dimension ldx, wGate and wUp (n, k) with leading dimension ldw. Each output tile is
    /// computed against both weights while it is in registers and L1, so neither product is ever written: on the 20M
    /// model the separate SwiGLU pass was 6.6 ms of a 222 ms forward and memory-bound (three 5.6 MB arrays a layer).
    /// Returns false, doing nothing, where the wide path does not apply (no AVX-512, fewer than 16 rows, K past one
    /// slice, too much to pack): the caller then runs the two products and the SwiGLU.
    /// </summary>
    public static bool SwiGluProduct(int m, int n, int k, float* x, int ldx, float* wGate, float* wUp, int ldw, float* y, int ldy, bool parallel = true)
    {
        if (!Avx512F.IsSupported || m < 16 || n == 0 || k == 0 || k > WideKC) return false;
        bool transposed = m <= n;
        if ((long)k * (((transposed ? m : n) + 15) & ~15) * (transposed ? 1 : 2) > MaxWidePack) return false;
        Wide(false, true, transposed, m, n, k, 1f, x, ldx, wGate, ldw, 0f, y, ldy, parallel, wUp);
        return true;
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

    /// <summary>
    /// Packs rows p0 + [r0, r1) of a row-major b (K, N) into every NR-column panel of the slice (panel jp at
    /// dst + jp * NR * kc, row r at r * NR in it), the last panel zero-padded past n.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackBRows(float* b, int ldb, int p0, int kc, int r0, int r1, int n, float* dst)
    {
        int full = n / NR;
        for (int r = r0; r < r1; r++)
        {
            float* src = b + (long)(p0 + r) * ldb;
            float* d = dst + (long)r * NR;
            for (int jp = 0; jp < full; jp++, d += (long)NR * kc)
            {
                Vector256.Store(Vector256.Load(src + jp * NR), d);
                Vector256.Store(Vector256.Load(src + jp * NR + 8), d + 8);
            }

            if (full * NR < n)
            {
                int col = 0;
                for (; full * NR + col < n; col++) d[col] = src[full * NR + col];
                for (; col < NR; col++) d[col] = 0f;
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
    private static void InnerProduct(int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel, bool wide)
    {
        int rowsPerTask = wide ? 32 : 33; // whole groups of the 4 (AVX-512: 32 registers) or 3 weight rows a kernel call takes
        int tasks = (n + rowsPerTask - 1) / rowsPerTask;
        if (parallel && tasks > 1 && (long)m * n * k >= 1 << 18)
        {
            Cores.For(tasks, t => InnerProductRows(t * rowsPerTask, Math.Min(n, (t + 1) * rowsPerTask), m, k, alpha, a, lda, b, ldb, beta, c, ldc, wide));
        }
        else
        {
            InnerProductRows(0, n, m, k, alpha, a, lda, b, ldb, beta, c, ldc, wide);
        }
    }

    /// <summary>
    /// Weight rows [j0, j1) against every activation row, in groups of 4 weight rows x 4 activation rows with AVX-512
    /// (<paramref name="wide"/>: 32 vector registers hold its 16 accumulators and 5 operands) or 3 x 4 without (12
    /// accumulators, 3 weight vectors and one activation vector: the 16 registers AVX2 has; the 4 x 4 form spilled
    /// there and ran M = 16 x 2048 x 2048 at half of ONNX Runtime's speed). Each group's K loop is its own method so
    /// no float argument holds a register across it (see <see cref="Kernel6x16Loop"/>).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void InnerProductRows(int j0, int j1, int m, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool wide)
    {
        int group = wide ? 4 : 3;
        float* sums = stackalloc float[16];
        int kv = k & ~7;
        for (int j = j0; j < j1; j += group)
        {
            int nj = Math.Min(group, j1 - j);
            // Rows past the end repeat the last row, so the kernel always reads valid memory; their sums are dropped.
            float* w0 = b + (long)j * ldb;
            float* w1 = b + (long)(j + Math.Min(1, nj - 1)) * ldb;
            float* w2 = b + (long)(j + Math.Min(2, nj - 1)) * ldb;
            float* w3 = b + (long)(j + Math.Min(3, nj - 1)) * ldb;
            for (int i = 0; i < m; i += 4)
            {
                int ni = Math.Min(4, m - i);
                nint x1 = (nint)Math.Min(1, ni - 1) * lda, x2 = (nint)Math.Min(2, ni - 1) * lda, x3 = (nint)Math.Min(3, ni - 1) * lda;
                if (wide) Dots4x4(kv, a + (long)i * lda, x1, x2, x3, w0, w1, w2, w3, sums);
                else Dots4x3(kv, a + (long)i * lda, x1, x2, x3, w0, w1, w2, sums);
                for (int r = 0; r < ni; r++)
                {
                    float* xr = a + (long)(i + r) * lda;
                    for (int q = 0; q < nj; q++)
                    {
                        float* wq = b + (long)(j + q) * ldb;
                        float acc = sums[r * group + q];
                        for (int p = kv; p < k; p++) acc += xr[p] * wq[p];
                        float* cij = c + (long)(i + r) * ldc + j + q;
                        float v = alpha * acc;
                        *cij = beta == 0f ? v : v + beta * *cij;
                    }
                }
            }
        }
    }

    /// <summary>sums[r * 4 + q] = x_r . w_q over the first kv (a multiple of 8) entries, x_r at x + o_r (o_0 = 0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Dots4x4(int kv, float* x, nint o1, nint o2, nint o3, float* w0, float* w1, float* w2, float* w3, float* sums)
    {
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
            var a0 = Vector256.Load(x + p);
            s00 = Vector256.FusedMultiplyAdd(a0, b0, s00);
            s01 = Vector256.FusedMultiplyAdd(a0, b1, s01);
            s02 = Vector256.FusedMultiplyAdd(a0, b2, s02);
            s03 = Vector256.FusedMultiplyAdd(a0, b3, s03);
            var a1 = Vector256.Load(x + o1 + p);
            s10 = Vector256.FusedMultiplyAdd(a1, b0, s10);
            s11 = Vector256.FusedMultiplyAdd(a1, b1, s11);
            s12 = Vector256.FusedMultiplyAdd(a1, b2, s12);
            s13 = Vector256.FusedMultiplyAdd(a1, b3, s13);
            var a2 = Vector256.Load(x + o2 + p);
            s20 = Vector256.FusedMultiplyAdd(a2, b0, s20);
            s21 = Vector256.FusedMultiplyAdd(a2, b1, s21);
            s22 = Vector256.FusedMultiplyAdd(a2, b2, s22);
            s23 = Vector256.FusedMultiplyAdd(a2, b3, s23);
            var a3 = Vector256.Load(x + o3 + p);
            s30 = Vector256.FusedMultiplyAdd(a3, b0, s30);
            s31 = Vector256.FusedMultiplyAdd(a3, b1, s31);
            s32 = Vector256.FusedMultiplyAdd(a3, b2, s32);
            s33 = Vector256.FusedMultiplyAdd(a3, b3, s33);
        }

        sums[0] = Vector256.Sum(s00); sums[1] = Vector256.Sum(s01); sums[2] = Vector256.Sum(s02); sums[3] = Vector256.Sum(s03);
        sums[4] = Vector256.Sum(s10); sums[5] = Vector256.Sum(s11); sums[6] = Vector256.Sum(s12); sums[7] = Vector256.Sum(s13);
        sums[8] = Vector256.Sum(s20); sums[9] = Vector256.Sum(s21); sums[10] = Vector256.Sum(s22); sums[11] = Vector256.Sum(s23);
        sums[12] = Vector256.Sum(s30); sums[13] = Vector256.Sum(s31); sums[14] = Vector256.Sum(s32); sums[15] = Vector256.Sum(s33);
    }

    /// <summary>
    /// sums[r * 3 + q] = x_r . w_q over the first kv (a multiple of 8) entries, x_r at x + o_r (o_0 = 0): <see cref="Dots4x4"/>
    /// with one weight row fewer, written out apart because the register count is the point of each.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Dots4x3(int kv, float* x, nint o1, nint o2, nint o3, float* w0, float* w1, float* w2, float* sums)
    {
        Vector256<float> s00 = default, s01 = default, s02 = default, s10 = default, s11 = default, s12 = default;
        Vector256<float> s20 = default, s21 = default, s22 = default, s30 = default, s31 = default, s32 = default;
        for (int p = 0; p < kv; p += 8)
        {
            var b0 = Vector256.Load(w0 + p);
            var b1 = Vector256.Load(w1 + p);
            var b2 = Vector256.Load(w2 + p);
            var a0 = Vector256.Load(x + p);
            s00 = Vector256.FusedMultiplyAdd(a0, b0, s00);
            s01 = Vector256.FusedMultiplyAdd(a0, b1, s01);
            s02 = Vector256.FusedMultiplyAdd(a0, b2, s02);
            var a1 = Vector256.Load(x + o1 + p);
            s10 = Vector256.FusedMultiplyAdd(a1, b0, s10);
            s11 = Vector256.FusedMultiplyAdd(a1, b1, s11);
            s12 = Vector256.FusedMultiplyAdd(a1, b2, s12);
            var a2 = Vector256.Load(x + o2 + p);
            s20 = Vector256.FusedMultiplyAdd(a2, b0, s20);
            s21 = Vector256.FusedMultiplyAdd(a2, b1, s21);
            s22 = Vector256.FusedMultiplyAdd(a2, b2, s22);
            var a3 = Vector256.Load(x + o3 + p);
            s30 = Vector256.FusedMultiplyAdd(a3, b0, s30);
            s31 = Vector256.FusedMultiplyAdd(a3, b1, s31);
            s32 = Vector256.FusedMultiplyAdd(a3, b2, s32);
        }

        sums[0] = Vector256.Sum(s00); sums[1] = Vector256.Sum(s01); sums[2] = Vector256.Sum(s02);
        sums[3] = Vector256.Sum(s10); sums[4] = Vector256.Sum(s11); sums[5] = Vector256.Sum(s12);
        sums[6] = Vector256.Sum(s20); sums[7] = Vector256.Sum(s21); sums[8] = Vector256.Sum(s22);
        sums[9] = Vector256.Sum(s30); sums[10] = Vector256.Sum(s31); sums[11] = Vector256.Sum(s32);
    }

    /// <summary>
    /// The AVX-512 path: r = s v with s (P, K) read where it lies, 8 rows at a time, each element broadcast, and v (K, Q)
    /// packed once into K-major panels of 32 (or a last 16) columns, so every step of the 8 x 32 micro-kernel is 16 FMAs
    /// on 512-bit registers for 2 vector loads and 8 broadcasts. Either c = op(a) op(b) (s = op(a), v = op(b)), or,
    /// when <paramref name="transposed"/> (against a transposed b with at most as many rows as columns: a linear layer's
    /// x W^T for a batch of requests), c^T = W x^T
    /// (s = W, v = x^T): the weight is streamed once in place and only the few activation rows are packed.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Wide(bool transA, bool transB, bool transposed, int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel,
        float* up = null)
    {
        var g = new WideProduct { K = k, Alpha = alpha, Beta = beta, C = c, Ldc = ldc, Paired = up != null };
        float* v;
        int vld;
        bool vAlongK; // v[p, q] = src[q * vld + p] (rows along K, packed by transposing) or src[p * vld + q]
        if (transposed)
        {
            g.Transposed = true;
            g.P = n; g.Q = m; g.S = b; g.S2 = up; g.SRowStep = ldb; g.SKStep = 1;
            v = a; vld = lda; vAlongK = true;
        }
        else
        {
            g.P = m; g.Q = n; g.S = a; g.SRowStep = transA ? 1 : lda; g.SKStep = transA ? lda : 1;
            v = b; vld = ldb; vAlongK = transB;
        }

        int padded = (g.Q + 15) & ~15;
        bool packUp = g.Paired && !transposed; // the up weight is v's second operand, packed beside the gate's
        float[] packed = ArrayPool<float>.Shared.Rent(k * padded * (packUp ? 2 : 1));
        try
        {
            fixed (float* vp = packed)
            {
                g.V = vp;
                g.V2 = vp + (long)k * padded;
                int panels = (g.Q + 31) / 32;
                bool par = parallel && Environment.ProcessorCount > 1 && (long)m * n * k >= 1 << 18;
                // Packing on one core while the other waited was 4% of the 20M model's forward (profile); on both,
                // the forward took 231-251 ms against 260-278 ms (Stopwatch, interleaved, three runs).
                int packs = packUp ? 2 * panels : panels; // pack ip < panels from v, the rest from up into V2
                float* upSrc = up;
                if (par && packs > 1 && (long)k * g.Q >= 1 << 16)
                {
                    float* vpp = vp, vp2 = g.V2;
                    Cores.For(packs, ip =>
                    {
                        if (ip < panels) PackPanel(v, vld, vAlongK, ip * 32, g.Q, k, vpp);
                        else PackPanel(upSrc, vld, vAlongK, (ip - panels) * 32, g.Q, k, vp2);
                    });
                }
                else
                {
                    for (int ip = 0; ip < panels; ip++) PackPanel(v, vld, vAlongK, ip * 32, g.Q, k, vp);
                    if (packUp) for (int ip = 0; ip < panels; ip++) PackPanel(up, vld, vAlongK, ip * 32, g.Q, k, g.V2);
                }

                // Tasks: up to 256 packed columns x up to 64 broadcast rows, fewer rows when that leaves under four
                // tasks per core. Each task runs K in slices of WideKC: 8 broadcast rows x 1024 (32 KiB, the L1's size)
                // meet every panel of the slice (up to 1 MiB, the L2's size) before the next 8 rows.
                int colBlocks = (g.Q + WideMC - 1) / WideMC;
                int cols = ((g.Q + colBlocks - 1) / colBlocks + 31) & ~31; // balanced, whole panels: 259 columns are 160 + 99, not 256 + 3
                colBlocks = (g.Q + cols - 1) / cols;
                int block = Math.Clamp((g.P * colBlocks / (4 * Environment.ProcessorCount) + 7) & ~7, 8, WBlock);
                int rowBlocks = (g.P + block - 1) / block;
                int tasks = rowBlocks * colBlocks;
                if (par && tasks > 1)
                {
                    Cores.For(tasks, t =>
                    {
                        int q0 = t / rowBlocks * cols, p0 = t % rowBlocks * block;
                        g.Run(p0, Math.Min(g.P, p0 + block), q0, Math.Min(g.Q, q0 + cols));
                    });
                }
                else
                {
                    g.Run(0, g.P, 0, g.Q);
                }
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(packed);
        }
    }

    /// <summary>Width of the packed panel that starts with <paramref name="remaining"/> columns left: 32, or 16 for the last few.</summary>
    private static int PanelWidth(int remaining) => remaining > 16 ? 32 : 16;

    /// <summary>
    /// Packs columns q0 .. q0 + width of v (K x Q) at dst + q0 * k as k groups of width floats, zero past Q:
    /// v[p, q] = src[q * ld + p] when alongK, else src[p * ld + q].
    /// </summary>
    private static void PackPanel(float* src, int ld, bool alongK, int q0, int q, int k, float* dst)
    {
        int width = PanelWidth(q - q0);
        int cols = Math.Min(width, q - q0);
        dst += (long)q0 * k;
        if (cols < width) new Span<float>(dst, k * width).Clear();
        if (!alongK)
        {
            for (int p = 0; p < k; p++)
            {
                float* row = src + (long)p * ld + q0;
                float* d = dst + (long)p * width;
                int j = 0;
                for (; j + 16 <= cols; j += 16) Vector512.Store(Vector512.Load(row + j), d + j);
                for (; j < cols; j++) d[j] = row[j];
            }

            return;
        }

        int r = 0;
        int kv = k & ~7;
        for (; r + 8 <= cols; r += 8)
        {
            float* s = src + (long)(q0 + r) * ld;
            for (int p = 0; p < kv; p += 8) Transpose8x8(s + p, ld, dst + (long)p * width + r, width);
            for (int p = kv; p < k; p++) for (int t = 0; t < 8; t++) dst[(long)p * width + r + t] = s[(long)t * ld + p];
        }

        for (; r < cols; r++)
        {
            float* s = src + (long)(q0 + r) * ld;
            for (int p = 0; p < k; p++) dst[(long)p * width + r] = s[p];
        }
    }

    /// <summary>One wide product's operands: r (P x Q) = s (P x K, in place) v (K x Q, packed), stored to c or c^T.</summary>
    private struct WideProduct
    {
        public int P, Q, K, SRowStep, SKStep, Ldc;
        public float* S, V, C;
        public float Alpha, Beta;
        public bool Transposed;

        /// <summary>
        /// A gate/up pair (<see cref="SwiGluProduct"/>): each tile is computed twice, against the gate weight and the
        /// up weight (S2 beside S when the weight is broadcast, V2 beside V when it is packed), and silu(gate) * up is
        /// stored. One K slice (K &lt;= WideKC), alpha 1, beta 0.
        /// </summary>
        public bool Paired;
        public float* S2, V2;

        /// <summary>Rows p0 .. p1 of s against columns q0 .. q1 of v (q0 a panel start), K in slices of WideKC.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public readonly void Run(int p0, int p1, int q0, int q1)
        {
            float* tile = stackalloc float[8 * 32];
            float* tile2 = stackalloc float[8 * 32];
            float* rows = stackalloc float[32 * 8];
            for (int pc = 0; pc < K; pc += WideKC)
            {
                int kc = Math.Min(WideKC, K - pc);
                float beta = pc == 0 ? Beta : 1f;
                for (int i = p0; i < p1; i += 8)
                {
                    int nr = Math.Min(8, p1 - i);
                    float* s = S + (long)i * SRowStep + (long)pc * SKStep;
                    for (int j = q0; j < q1; j += PanelWidth(Q - j))
                    {
                        int width = PanelWidth(Q - j);
                        int cols = Math.Min(width, Q - j);
                        float* vp = V + (long)j * K + (long)pc * width;
                        if (width == 32) Broadcast8x32(kc, s, SRowStep, SKStep, nr, vp, tile);
                        else Broadcast8x16(kc, s, SRowStep, SKStep, nr, vp, tile);
                        if (Paired)
                        {
                            float* s2 = Transposed ? S2 + (long)i * SRowStep : s;
                            float* vp2 = Transposed ? vp : V2 + (long)j * K;
                            if (width == 32) Broadcast8x32(kc, s2, SRowStep, SKStep, nr, vp2, tile2);
                            else Broadcast8x16(kc, s2, SRowStep, SKStep, nr, vp2, tile2);
                            SwiGluTile(tile, tile2, 8 * width);
                        }

                        if (Transposed) StoreTransposed(tile, rows, width, nr, cols, C + (long)j * Ldc + i, Ldc, Alpha, beta);
                        else StoreTile(tile, width, nr, cols, C + (long)i * Ldc + j, Ldc, Alpha, beta);
                    }
                }
            }
        }
    }

    /// <summary>gate[i] = silu(gate[i]) * up[i] = gate[i] * up[i] / (1 + e^-gate[i]) for i &lt; n (a multiple of 16).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void SwiGluTile(float* gate, float* up, int n)
    {
        for (int i = 0; i < n; i += 16)
        {
            var g = Vector512.Load(gate + i);
            (g * Vector512.Load(up + i) / (Vector512<float>.One + VectorExp.Exp(-g))).Store(gate + i);
        }
    }

    /// <summary>c[r * ldc + q] = alpha * tile[r * width + q] + beta * c (c not read when beta = 0), r &lt; nr, q &lt; cols.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreTile(float* tile, int width, int nr, int cols, float* c, int ldc, float alpha, float beta)
    {
        var va = Vector512.Create(alpha);
        var vb = Vector512.Create(beta);
        for (int r = 0; r < nr; r++)
        {
            float* row = c + (long)r * ldc;
            float* t = tile + r * width;
            int q = 0;
            for (; q + 16 <= cols; q += 16)
            {
                var x = Vector512.Load(t + q) * va;
                if (beta != 0f) x = Vector512.FusedMultiplyAdd(Vector512.Load(row + q), vb, x);
                x.Store(row + q);
            }

            for (; q < cols; q++) row[q] = beta == 0f ? alpha * t[q] : alpha * t[q] + beta * row[q];
        }
    }

    /// <summary>c[q * ldc + r] = alpha * tile[r * width + q] + beta * c, r &lt; nr, q &lt; cols: each c row's nr values from one transposed vector.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreTransposed(float* tile, float* rows, int width, int nr, int cols, float* c, int ldc, float alpha, float beta)
    {
        for (int q8 = 0; q8 < cols; q8 += 8) Transpose8x8(tile + q8, width, rows + q8 * 8, 8);
        var va = Vector256.Create(alpha);
        var vb = Vector256.Create(beta);
        for (int q = 0; q < cols; q++)
        {
            float* row = c + (long)q * ldc;
            var x = Vector256.Load(rows + q * 8) * va;
            if (nr == 8)
            {
                if (beta != 0f) x = Vector256.FusedMultiplyAdd(Vector256.Load(row), vb, x);
                x.Store(row);
            }
            else
            {
                for (int r = 0; r < nr; r++) row[r] = beta == 0f ? x[r] : x[r] + beta * row[r];
            }
        }
    }

    /// <summary>
    /// tile[r * 32 + q] = sum_p s[r * rowStep + p * kStep] v[p * 32 + q] for r &lt; 8 (rows past nr repeat the last;
    /// their sums are dropped by the caller), q &lt; 32.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Broadcast8x32(int kc, float* s, int rowStep, int kStep, int nr, float* xt, float* tile)
    {
        nint o1 = nr > 1 ? rowStep : 0, o2 = (nint)rowStep * Math.Min(2, nr - 1), o3 = (nint)rowStep * Math.Min(3, nr - 1);
        nint o4 = (nint)rowStep * Math.Min(4, nr - 1), o5 = (nint)rowStep * Math.Min(5, nr - 1), o6 = (nint)rowStep * Math.Min(6, nr - 1);
        nint o7 = (nint)rowStep * Math.Min(7, nr - 1), step = kStep;
        Vector512<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default, c30 = default, c31 = default;
        Vector512<float> c40 = default, c41 = default, c50 = default, c51 = default, c60 = default, c61 = default, c70 = default, c71 = default;
        for (int p = 0; p < kc; p++)
        {
            var b0 = Vector512.Load(xt);
            var b1 = Vector512.Load(xt + 16);
            var x = Vector512.Create(s[0]);
            c00 = Vector512.FusedMultiplyAdd(x, b0, c00);
            c01 = Vector512.FusedMultiplyAdd(x, b1, c01);
            x = Vector512.Create(s[o1]);
            c10 = Vector512.FusedMultiplyAdd(x, b0, c10);
            c11 = Vector512.FusedMultiplyAdd(x, b1, c11);
            x = Vector512.Create(s[o2]);
            c20 = Vector512.FusedMultiplyAdd(x, b0, c20);
            c21 = Vector512.FusedMultiplyAdd(x, b1, c21);
            x = Vector512.Create(s[o3]);
            c30 = Vector512.FusedMultiplyAdd(x, b0, c30);
            c31 = Vector512.FusedMultiplyAdd(x, b1, c31);
            x = Vector512.Create(s[o4]);
            c40 = Vector512.FusedMultiplyAdd(x, b0, c40);
            c41 = Vector512.FusedMultiplyAdd(x, b1, c41);
            x = Vector512.Create(s[o5]);
            c50 = Vector512.FusedMultiplyAdd(x, b0, c50);
            c51 = Vector512.FusedMultiplyAdd(x, b1, c51);
            x = Vector512.Create(s[o6]);
            c60 = Vector512.FusedMultiplyAdd(x, b0, c60);
            c61 = Vector512.FusedMultiplyAdd(x, b1, c61);
            x = Vector512.Create(s[o7]);
            c70 = Vector512.FusedMultiplyAdd(x, b0, c70);
            c71 = Vector512.FusedMultiplyAdd(x, b1, c71);
            s += step;
            xt += 32;
        }

        c00.Store(tile); c01.Store(tile + 16); c10.Store(tile + 32); c11.Store(tile + 48);
        c20.Store(tile + 64); c21.Store(tile + 80); c30.Store(tile + 96); c31.Store(tile + 112);
        c40.Store(tile + 128); c41.Store(tile + 144); c50.Store(tile + 160); c51.Store(tile + 176);
        c60.Store(tile + 192); c61.Store(tile + 208); c70.Store(tile + 224); c71.Store(tile + 240);
    }

    /// <summary>As <see cref="Broadcast8x32"/> for a 16-column panel: tile[r * 16 + q].</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Broadcast8x16(int kc, float* s, int rowStep, int kStep, int nr, float* xt, float* tile)
    {
        nint o1 = nr > 1 ? rowStep : 0, o2 = (nint)rowStep * Math.Min(2, nr - 1), o3 = (nint)rowStep * Math.Min(3, nr - 1);
        nint o4 = (nint)rowStep * Math.Min(4, nr - 1), o5 = (nint)rowStep * Math.Min(5, nr - 1), o6 = (nint)rowStep * Math.Min(6, nr - 1);
        nint o7 = (nint)rowStep * Math.Min(7, nr - 1), step = kStep;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        for (int p = 0; p < kc; p++)
        {
            var x = Vector512.Load(xt);
            c0 = Vector512.FusedMultiplyAdd(Vector512.Create(s[0]), x, c0);
            c1 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o1]), x, c1);
            c2 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o2]), x, c2);
            c3 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o3]), x, c3);
            c4 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o4]), x, c4);
            c5 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o5]), x, c5);
            c6 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o6]), x, c6);
            c7 = Vector512.FusedMultiplyAdd(Vector512.Create(s[o7]), x, c7);
            s += step;
            xt += 16;
        }

        c0.Store(tile); c1.Store(tile + 16); c2.Store(tile + 32); c3.Store(tile + 48);
        c4.Store(tile + 64); c5.Store(tile + 80); c6.Store(tile + 96); c7.Store(tile + 112);
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
        // The tile's C rows (ldc apart: a page each for a wide C) are read after the K loop when beta != 0 and written
        // either way; asking for them first lets the misses overlap the loop instead of stalling its stores.
        if (Sse.IsSupported)
        {
            for (int r = 0; r < mr; r++)
            {
                Sse.Prefetch0(c + (long)r * ldc);
                Sse.Prefetch0(c + (long)r * ldc + NR - 1);
            }
        }

        float* tile = stackalloc float[MR * NR];
        Kernel6x16Loop(kc, a, rowStep, kStep, bp, mr, tile);
        if (mr == MR && nr == NR)
        {
            for (int r = 0; r < MR; r++) StoreRow(c + (long)r * ldc, Vector256.Load(tile + r * NR), Vector256.Load(tile + r * NR + 8), alpha, beta);
            return;
        }

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

    /// <summary>
    /// The 6 x 16 tile's K loop, written to tile[r * NR + q]. Its own method with no float arguments: with alpha and beta
    /// live across the loop the JIT kept them in two of the 16 ymm registers and spilled an accumulator to the stack,
    /// a store and a reload every step on one FMA chain (AVX2 1024^3 ran at 37% of a core's peak single-threaded).
    /// Twelve accumulators, two B vectors and one broadcast are the 15 registers the loop needs.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Kernel6x16Loop(int kc, float* a, int rowStep, int kStep, float* bp, int mr, float* tile)
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

        c00.Store(tile); c01.Store(tile + 8);
        c10.Store(tile + 16); c11.Store(tile + 24);
        c20.Store(tile + 32); c21.Store(tile + 40);
        c30.Store(tile + 48); c31.Store(tile + 56);
        c40.Store(tile + 64); c41.Store(tile + 72);
        c50.Store(tile + 80); c51.Store(tile + 88);
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
    private static void SmallM(bool transB, int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc, bool parallel, bool zmm)
    {
        const int chunk = 64;
        int chunks = (n + chunk - 1) / chunk;
        void Run(int t)
        {
            int j0 = t * chunk;
            int j1 = Math.Min(n, j0 + chunk);
            if (transB && m == 1 && k < ShortDot)
            {
                ShortDots(j0, j1, k, alpha, a, b, ldb, beta, c, zmm);
            }
            else if (transB && m == 1 && !zmm)
            {
                RowDots(j0, j1, k, alpha, a, b, ldb, beta, c);
            }
            else if (transB)
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

        if (parallel && chunks > 1 && (long)n * k >= 1 << 16) Cores.For(chunks, Run);
        else for (int t = 0; t < chunks; t++) Run(t);
    }

    /// <summary>
    /// c[j] = alpha * x . b_j + beta * c[j] for j0 &lt;= j &lt; j1, k &lt; <see cref="ShortDot"/>: one row against a transposed
    /// b with short rows (a LoRA adapter's B (N, r) at decode). Inline vector steps of 16 and 8, then scalars: a library
    /// dot product per output spent most of its time entering and leaving the call (14 us for 2048 outputs of 16).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ShortDots(int j0, int j1, int k, float alpha, float* x, float* b, int ldb, float beta, float* c, bool zmm)
    {
        int k16 = zmm ? k & ~15 : 0; // without 512-bit vectors the 8-wide steps do it all
        for (int j = j0; j < j1; j++)
        {
            float* bj = b + (long)j * ldb;
            float sum = 0f;
            if (k16 > 0)
            {
                var acc = Vector512.Multiply(Vector512.Load(x), Vector512.Load(bj));
                for (int p = 16; p < k16; p += 16) acc = Vector512.FusedMultiplyAdd(Vector512.Load(x + p), Vector512.Load(bj + p), acc);
                sum = Vector512.Sum(acc);
            }

            int q = k16;
            for (; q + 8 <= k; q += 8) sum += Vector256.Sum(Vector256.Load(x + q) * Vector256.Load(bj + q));
            for (; q < k; q++) sum += x[q] * bj[q];
            c[j] = beta == 0f ? alpha * sum : alpha * sum + beta * c[j];
        }
    }

    /// <summary>
    /// c[j] = alpha * x . b_j + beta * c[j] for j0 &lt;= j &lt; j1: one row against a transposed b (a decode step's linear
    /// layer, W streamed once), four weight rows at a time with two accumulators each (eight FMA chains; a library dot
    /// product per output has one row's worth in flight and ran at 0.64x of ONNX Runtime at 1 x 2048 x 2048 on AVX2).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowDots(int j0, int j1, int k, float alpha, float* x, float* b, int ldb, float beta, float* c)
    {
        float* sums = stackalloc float[4];
        int k16 = k & ~15;
        for (int j = j0; j < j1; j += 4)
        {
            int nj = Math.Min(4, j1 - j);
            float* w0 = b + (long)j * ldb;
            float* w1 = b + (long)(j + Math.Min(1, nj - 1)) * ldb;
            float* w2 = b + (long)(j + Math.Min(2, nj - 1)) * ldb;
            float* w3 = b + (long)(j + Math.Min(3, nj - 1)) * ldb;
            Dots1x4(k16, x, w0, w1, w2, w3, sums);
            for (int q = 0; q < nj; q++)
            {
                float* wq = b + (long)(j + q) * ldb;
                float acc = sums[q];
                for (int p = k16; p < k; p++) acc += x[p] * wq[p];
                c[j + q] = beta == 0f ? alpha * acc : alpha * acc + beta * c[j + q];
            }
        }
    }

    /// <summary>sums[q] = x . w_q over the first k16 (a multiple of 16) entries.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Dots1x4(int k16, float* x, float* w0, float* w1, float* w2, float* w3, float* sums)
    {
        Vector256<float> s0 = default, s1 = default, s2 = default, s3 = default, t0 = default, t1 = default, t2 = default, t3 = default;
        for (int p = 0; p < k16; p += 16)
        {
            var a0 = Vector256.Load(x + p);
            var a1 = Vector256.Load(x + p + 8);
            s0 = Vector256.FusedMultiplyAdd(a0, Vector256.Load(w0 + p), s0);
            t0 = Vector256.FusedMultiplyAdd(a1, Vector256.Load(w0 + p + 8), t0);
            s1 = Vector256.FusedMultiplyAdd(a0, Vector256.Load(w1 + p), s1);
            t1 = Vector256.FusedMultiplyAdd(a1, Vector256.Load(w1 + p + 8), t1);
            s2 = Vector256.FusedMultiplyAdd(a0, Vector256.Load(w2 + p), s2);
            t2 = Vector256.FusedMultiplyAdd(a1, Vector256.Load(w2 + p + 8), t2);
            s3 = Vector256.FusedMultiplyAdd(a0, Vector256.Load(w3 + p), s3);
            t3 = Vector256.FusedMultiplyAdd(a1, Vector256.Load(w3 + p + 8), t3);
        }

        sums[0] = Vector256.Sum(s0 + t0);
        sums[1] = Vector256.Sum(s1 + t1);
        sums[2] = Vector256.Sum(s2 + t2);
        sums[3] = Vector256.Sum(s3 + t3);
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
