using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

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
    // K = 40 is 16 + 16 + 8 with 512-bit vectors and five 8-wide steps without.
    private static readonly object[] Shapes =
    {
        new TestCaseData(12, 128, 5).SetName("{m}_M12_N128_K5_SmallestWide"),
        new TestCaseData(13, 131, 1030).SetName("{m}_M13_N131_K1030_PartialPanelRowTailTwoKSlices"),
        new TestCaseData(45, 140, 37).SetName("{m}_M45_N140_K37_WideThenNarrowPanel"),
        new TestCaseData(150, 140, 1030).SetName("{m}_M150_N140_K1030_MoreRowsThanColumns"),
        new TestCaseData(300, 403, 70).SetName("{m}_M300_N403_K70_CrossesTaskBlocks"),
        new TestCaseData(65, 17, 40).SetName("{m}_M65_N17_K40_JustPast64Rows"),
        new TestCaseData(1, 70, 40).SetName("{m}_M1_N70_K40_ShortDotsBothVectorWidths"),
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
