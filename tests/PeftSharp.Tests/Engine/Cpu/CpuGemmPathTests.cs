using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Engine.Cpu;

/// <summary>
/// The CPU GEMM's own paths, called directly so both run on this machine: with AVX-512 the 8 x 32 broadcast kernel
/// (<c>allowWide</c>), and the AVX2 kernels every CPU without it runs. Operands sit in buffers with leading dimensions
/// past their widths, whose padding must come back untouched.
/// </summary>
public sealed class CpuGemmPathTests
{
    // (M, N, K). Against a transposed b the wide path computes c^T = W x^T from 12 rows and 128 columns: 12 x 128 is
    // its smallest product (K = 5: the packing's transposes are all tail); M = 13 leaves a 16-column panel 13 wide,
    // N = 131 a last block of 3 broadcast rows, K = 1030 a second K slice of 6 (slices are 1024) after a full one;
    // M = 45 is a 32-column panel then a 16 one. Past 64 rows it takes every transposition: M = 150 > N = 140 stores
    // tiles straight (panels of b's 140 columns); 300 x 403 splits the 300 packed columns into two task blocks (160 + 140); 65 x 17 is just past
    // 64 rows with a single narrow panel. One row against short transposed rows (K < 64) takes inline dot products:
    // K = 40 is 16 + 16 + 8 with 512-bit vectors and five 8-wide steps without. A packed operand of up to 64K floats takes
    // the wide path from 16 rows whatever the transposition (16 x 40 x 33, and an attention block's 64 x 96 x 64); 15
    // rows stay on the AVX2 kernels. Without AVX-512 (or with allowWide off) 2-64 rows against a transposed b take the
    // 4-row x 3-weight inner products (7 rows: 4 + 3; 100 weights in tasks of 33: a last task of 1; K = 45: a 5-float
    // tail) and one row the 4-weight dot products (K = 1030 and 100: 16-float steps, then a tail; 70 and 5 weights).
    private static readonly object[] Shapes =
    {
        new TestCaseData(8, 128, 5).SetName("{m}_M8_N128_K5_SmallestWide"),
        new TestCaseData(11, 133, 77).SetName("{m}_M11_N133_K77_FewRowsWidePartialPanels"),
        new TestCaseData(7, 128, 5).SetName("{m}_M7_N128_K5_JustBelowWideRows"),
        new TestCaseData(13, 131, 1030).SetName("{m}_M13_N131_K1030_PartialPanelRowTailTwoKSlices"),
        new TestCaseData(45, 140, 37).SetName("{m}_M45_N140_K37_WideThenNarrowPanel"),
        new TestCaseData(150, 140, 1030).SetName("{m}_M150_N140_K1030_MoreRowsThanColumns"),
        new TestCaseData(300, 403, 70).SetName("{m}_M300_N403_K70_CrossesTaskBlocks"),
        new TestCaseData(65, 17, 40).SetName("{m}_M65_N17_K40_JustPast64Rows"),
        new TestCaseData(1, 70, 40).SetName("{m}_M1_N70_K40_ShortDotsBothVectorWidths"),
        new TestCaseData(16, 40, 33).SetName("{m}_M16_N40_K33_SmallPackFrom16Rows"),
        new TestCaseData(64, 96, 64).SetName("{m}_M64_N96_K64_AttentionBlock"),
        new TestCaseData(15, 40, 33).SetName("{m}_M15_N40_K33_JustBelowSmallPackRows"),
        new TestCaseData(7, 100, 45).SetName("{m}_M7_N100_K45_InnerProductRowAndWeightTails"),
        new TestCaseData(40, 35, 515).SetName("{m}_M40_N35_K515_InnerProductLongKInParallel"),
        new TestCaseData(1, 70, 1030).SetName("{m}_M1_N70_K1030_RowDotsWeightAndKTails"),
        new TestCaseData(1, 5, 100).SetName("{m}_M1_N5_K100_RowDotsFewWeights"),
    };

    [TestCaseSource(nameof(Shapes))]
    public void Sgemm_WideAndAvx2Paths_MatchReference_PaddingUntouched(int m, int n, int k)
    {
        foreach (bool transA in new[] { false, true })
        foreach (bool transB in new[] { false, true })
        foreach (float beta in new[] { 0f, 0.5f })
        {
            var shape = new MatMulShape(1, m, n, k, transA, transB, false);
            var a = TestData.Uniform(m * k, 3 + m);
            var b = TestData.Uniform(k * n, 5 + n);
            var c0 = TestData.Uniform(m * n, 7 + k);
            var expected = (float[])c0.Clone();
            MatMulReference.Forward(a, b, expected, shape, 1.5f, beta);
            foreach (bool wide in new[] { true, false })
            {
                string what = $"M{m} N{n} K{k} transA={transA} transB={transB} beta={beta} wide={wide}";
                var c = Run(a, transA ? k : m, transA ? m : k, b, transB ? n : k, transB ? k : n, c0, m, n, k, transA, transB, beta, wide, out var padding);
                Check.Close(c, expected, Tolerances.Dot(k), what);
                Check.PaddingUntouched(padding, what);
            }
        }
    }

    // (M, N, K): weights broadcast (M <= N) with a 16-wide last panel of rows, weights packed side by side (M > N),
    // a full K slice of 1024 over two task blocks; M = 15 and K = 1025 are refused (the caller runs the unfused ops).
    [TestCase(16, 45, 33, true)]
    [TestCase(40, 17, 33, true)]
    [TestCase(300, 70, 1024, true)]
    [TestCase(15, 40, 33, false)]
    [TestCase(20, 40, 1025, false)]
    public unsafe void SwiGluProduct_BothLayouts_MatchReference_PaddingUntouched(int m, int n, int k, bool fused)
    {
        if (!System.Runtime.Intrinsics.X86.Avx512F.IsSupported) Assert.Ignore("the fused gate/up product needs AVX-512; without it the caller always runs the unfused ops");
        var (x, wg, wu, expected, tolerance) = SwiGluCase(m, n, k, 31);
        int ldx = k + 3, ldw = k + 5, ldy = n + 4;
        var px = Padded(x, m, k, ldx, float.NaN);
        var pg = Padded(wg, n, k, ldw, float.NaN);
        var pu = Padded(wu, n, k, ldw, float.NaN);
        var py = Enumerable.Repeat(float.NaN, m * ldy).ToArray();
        bool ran;
        fixed (float* xp = px, gp = pg, up = pu, yp = py)
        {
            ran = Gemm.SwiGluProduct(m, n, k, xp, ldx, gp, up, ldw, yp, ldy);
        }

        Assert.That(ran, Is.EqualTo(fused), "whether the fused path takes the shape");
        if (!fused)
        {
            Assert.That(py.All(float.IsNaN), "a refused shape must leave y untouched");
            return;
        }

        var y = new float[m * n];
        var pad = new List<float>();
        for (int i = 0; i < m; i++)
        {
            Array.Copy(py, i * ldy, y, i * n, n);
            for (int j = n; j < ldy; j++) pad.Add(py[i * ldy + j]);
        }

        Check.Close(y, expected, tolerance, $"swiglu product M{m} N{n} K{k}");
        Check.PaddingUntouched(pad.ToArray(), $"swiglu product M{m} N{n} K{k}");
    }

    /// <summary>
    /// Inputs and the reference output of a fused gate/up product. Weights scaled by 1/sqrt(K) keep both products O(1),
    /// where y's sensitivity to each is at most about 2 (|d y / d gate| &lt;= 1.1 |up|, |d y / d up| = |silu(gate)|): the
    /// tolerance is twice the dot product's.
    /// </summary>
    internal static (float[] X, float[] WGate, float[] WUp, float[] Expected, (double Atol, double Rtol) Tolerance) SwiGluCase(int m, int n, int k, int seed)
    {
        float w = 2f / MathF.Sqrt(k);
        var x = TestData.Uniform(m * k, seed + m);
        var wg = TestData.Uniform(n * k, seed + 1 + n, -w, w);
        var wu = TestData.Uniform(n * k, seed + 2 + k, -w, w);
        var expected = new float[m * n];
        MatMulReference.LinearSwiGlu(x, wg, wu, expected, m, n, k);
        var dot = Tolerances.Dot(k);
        return (x, wg, wu, expected, (2 * dot.Atol, 2 * dot.Rtol));
    }

    /// <summary>Copies a (rowsA x colsA) and b into NaN-padded buffers 3 and 5 floats wider, c into one 4 wider, and runs Sgemm.</summary>
    private static unsafe float[] Run(
        float[] a, int rowsA, int colsA, float[] b, int rowsB, int colsB, float[] c0, int m, int n, int k,
        bool transA, bool transB, float beta, bool wide, out float[] padding)
    {
        const float Sentinel = float.NaN; // a read of any padding would reach c as NaN
        int lda = colsA + 3, ldb = colsB + 5, ldc = n + 4;
        var pa = Padded(a, rowsA, colsA, lda, Sentinel);
        var pb = Padded(b, rowsB, colsB, ldb, Sentinel);
        var pc = Padded(c0, m, n, ldc, Sentinel);
        fixed (float* ap = pa, bp = pb, cp = pc)
        {
            Gemm.Sgemm(transA, transB, m, n, k, 1.5f, ap, lda, bp, ldb, beta, cp, ldc, parallel: true, allowWide: wide);
        }

        var c = new float[m * n];
        var pad = new List<float>();
        for (int i = 0; i < m; i++)
        {
            Array.Copy(pc, i * ldc, c, i * n, n);
            for (int j = n; j < ldc; j++) pad.Add(pc[i * ldc + j]);
        }

        padding = pad.ToArray();
        return c;
    }

    private static float[] Padded(float[] x, int rows, int cols, int ld, float sentinel)
    {
        var p = Enumerable.Repeat(sentinel, rows * ld).ToArray();
        for (int i = 0; i < rows; i++) Array.Copy(x, i * cols, p, i * ld, cols);
        return p;
    }
}
