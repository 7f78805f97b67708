using NUnit.Framework;
using PeftSharp.Engine.Ilgpu;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class MatMulTests : BackendTest
{
    public MatMulTests(string backend)
        : base(backend)
    {
    }

    // (batch, M, N, K, broadcastB): size 1, odd sizes, sizes off every tile (6, 16, 96, 256), M < K, K not a multiple of 32.
    private static readonly object[] Shapes =
    {
        new TestCaseData(1, 1, 1, 1, false).SetName("{m}_B1_M1_N1_K1"),
        new TestCaseData(1, 1, 7, 5, false).SetName("{m}_B1_M1_N7_K5"),
        new TestCaseData(1, 3, 5, 33, false).SetName("{m}_B1_M3_N5_K33_MlessK"),
        new TestCaseData(1, 7, 17, 19, false).SetName("{m}_B1_M7_N17_K19"),
        new TestCaseData(1, 16, 16, 16, false).SetName("{m}_B1_M16_N16_K16"),
        new TestCaseData(1, 33, 18, 45, false).SetName("{m}_B1_M33_N18_K45"),
        new TestCaseData(3, 5, 9, 7, false).SetName("{m}_B3_M5_N9_K7"),
        new TestCaseData(2, 17, 6, 20, true).SetName("{m}_B2_M17_N6_K20_sharedB"),
    };

    [TestCaseSource(nameof(Shapes))]
    public void MatMul_AllTranspositions_MatchReference(int batch, int m, int n, int k, bool broadcastB)
    {
        foreach (var algorithm in AlgorithmsToTest(m, n))
        {
            foreach (bool ta in new[] { false, true })
            foreach (bool tb in new[] { false, true })
            foreach (float beta in new[] { 0f, 0.5f })
            {
                RunCase(batch, m, n, k, broadcastB, ta, tb, alpha: 1.5f, beta, algorithm);
            }
        }
    }

    [TestCase(100, 300, 270, TestName = "MatMul_CpuBlocks_M100_N300_K270_CrossesEveryBlock")]
    [TestCase(5, 1000, 513, TestName = "MatMul_CpuSmallM_M5_N1000_K513")]
    [TestCase(100, 40, 270, TestName = "MatMul_CpuBlocks_M100_N40_K270_AReadInPlace")]
    [TestCase(97, 64, 300, TestName = "MatMul_CpuBlocks_M97_N64_K300_AReadInPlaceAtTheLimit")]
    [TestCase(97, 65, 300, TestName = "MatMul_CpuBlocks_M97_N65_K300_APackedPastTheLimit")]
    [TestCase(4, 70, 600, TestName = "MatMul_CpuFewRows_M4_N70_K600_InnerProducts")]
    [TestCase(1, 70, 33, TestName = "MatMul_CpuFewRows_M1_N70_K33_ShortDotsAndRegisterBlocks")]
    [TestCase(1, 70, 24, TestName = "MatMul_CpuFewRows_M1_N70_K24_ShortDotsSixteenThenEight")]
    [TestCase(1, 40, 15, TestName = "MatMul_CpuFewRows_M1_N40_K15_ShortDotsEightThenScalars")]
    [TestCase(3, 96, 64, TestName = "MatMul_CpuFewRows_M3_N96_K64_AttentionDecodeShape")]
    [TestCase(2, 40, 600, TestName = "MatMul_CpuFewRows_M2_N40_K600")]
    [TestCase(37, 45, 515, TestName = "MatMul_CpuBatchRows_M37_N45_K515_InnerProductsPastSixteenRows")]
    [TestCase(65, 9, 512, TestName = "MatMul_CpuBatchRows_M65_N9_K512_JustPastTheInnerProductRows")]
    public void MatMul_LargerShapes_MatchReference(int m, int n, int k)
    {
        if (IsSimulator) Assert.Ignore("shape too large for ILGPU's CPU simulator; covered by the small shapes");
        foreach (bool ta in new[] { false, true })
        foreach (bool tb in new[] { false, true })
        {
            RunCase(1, m, n, k, false, ta, tb, alpha: 1f, beta: 0.25f, MatMulAlgorithm.Auto);
        }
    }

    [Test]
    public void Linear_FoldsLeadingDims_MatchesReference()
    {
        var x = TestData.Uniform(2 * 3 * 10, 1);
        var w = TestData.Uniform(7 * 10, 2);
        var expected = new float[2 * 3 * 7];
        MatMulReference.Forward(x, w, expected, new MatMulShape(1, 6, 7, 10, false, true, true));
        var y = Output("y", 2, 3, 7);
        Ops.Linear(Input("x", x, 2, 3, 10), Input("w", w, 7, 10), y);
        Expect(y, expected, Tolerances.Dot(10), "linear");
    }

    // (M, N, K). On the CPU with AVX-512 the fused path takes 16 rows and more with K up to one slice (1024): M <= N
    // broadcasts the weights (16 x 40), M > N packs both weights side by side (40 x 17; 33 x 140 leaves a 16-wide last
    // panel of each); M = 15 and K = 1030 take the two products and the separate SwiGLU. Size 1 everywhere too.
    [TestCase(1, 1, 1, TestName = "LinearSwiGlu_M1_N1_K1")]
    [TestCase(15, 9, 7, TestName = "LinearSwiGlu_M15_N9_K7_BelowTheFusedRows")]
    [TestCase(16, 40, 33, TestName = "LinearSwiGlu_M16_N40_K33_WeightsBroadcast")]
    [TestCase(40, 17, 33, TestName = "LinearSwiGlu_M40_N17_K33_WeightsPackedSideBySide")]
    [TestCase(150, 140, 64, TestName = "LinearSwiGlu_M150_N140_K64_TaskBlocksAndNarrowPanels")]
    [TestCase(20, 24, 1030, TestName = "LinearSwiGlu_M20_N24_K1030_PastOneSliceUnfused")]
    public void LinearSwiGlu_MatchesReference(int m, int n, int k)
    {
        if (IsSimulator && (long)m * n * k > 50_000) Assert.Ignore("shape too large for ILGPU's CPU simulator; covered by the small shapes");
        var (x, wg, wu, expected, tolerance) = PeftSharp.Tests.Engine.Cpu.CpuGemmPathTests.SwiGluCase(m, n, k, 21);
        var y = Output("y", m, n);
        Ops.LinearSwiGlu(Input("x", x, m, k), Input("w_gate", wg, n, k), Input("w_up", wu, n, k), y);
        Expect(y, expected, tolerance, $"linear swiglu M{m} N{n} K{k}");
    }

    [Test]
    public void LinearSwiGlu_MismatchedWeights_ErrorNamesThem()
    {
        var e = Assert.Throws<ArgumentException>(() =>
            Ops.LinearSwiGlu(Input("x", new float[12], 3, 4), Input("w_gate", new float[20], 5, 4), Input("w_up", new float[24], 6, 4), Output("y", 3, 5)))!;
        Assert.That(e.Message, Does.Contain("'w_gate' [5, 4]").And.Contain("'w_up' [6, 4]"));
        e = Assert.Throws<ArgumentException>(() =>
            Ops.LinearSwiGlu(Input("x", new float[15], 3, 5), Input("w_gate", new float[20], 5, 4), Input("w_up", new float[20], 5, 4), Output("y", 3, 5)))!;
        Assert.That(e.Message, Does.Contain("'x' [3, 5]"));
    }

    [Test]
    public void LinearBackward_MatchesReferenceAndAccumulates()
    {
        const int rows = 5, k = 9, n = 4;
        var x = TestData.Uniform(rows * k, 3);
        var w = TestData.Uniform(n * k, 4);
        var dy = TestData.Uniform(rows * n, 5);
        var dxExpected = new float[rows * k];
        MatMulReference.Forward(dy, w, dxExpected, new MatMulShape(1, rows, k, n, false, false, true));
        var dwExpected = TestData.Uniform(n * k, 6); // previous gradient, accumulated into
        var dwInitial = (float[])dwExpected.Clone();
        MatMulReference.Forward(dy, x, dwExpected, new MatMulShape(1, n, k, rows, true, false, true), beta: 1f);
        var dx = Output("dx", rows, k);
        var dw = Input("dw", dwInitial, n, k);
        Ops.LinearBackward(Input("x", x, rows, k), Input("w", w, n, k), Input("dy", dy, rows, n), dx, dw, accumulateWeight: true);
        Expect(dx, dxExpected, Tolerances.Dot(n), "dx");
        Expect(dw, dwExpected, Tolerances.Dot(rows), "dw accumulated");
    }

    [Test]
    public void MatMul_MismatchedShapes_ErrorNamesBothTensors()
    {
        var a = Input("activations", new float[6], 2, 3);
        var b = Input("weight", new float[8], 4, 2);
        var c = Output("out", 2, 2);
        var e = Assert.Throws<ArgumentException>(() => Ops.MatMul(a, b, c))!;
        Assert.That(e.Message, Does.Contain("'activations' [2, 3]").And.Contain("'weight' [4, 2]"));
        var e2 = Assert.Throws<ArgumentException>(() => Ops.MatMul(a, Input("w2", new float[6], 3, 2), Output("wrong", 3, 3)))!;
        Assert.That(e2.Message, Does.Contain("'wrong' [3, 3]"));
    }

    private IEnumerable<MatMulAlgorithm> AlgorithmsToTest(int m, int n)
    {
        if (Device is IlgpuDevice ilgpu && ilgpu.SupportsTiledMatMul)
        {
            yield return MatMulAlgorithm.Naive;
            yield return MatMulAlgorithm.Tiled;
        }
        else
        {
            yield return MatMulAlgorithm.Auto;
        }
    }

    private void RunCase(int batch, int m, int n, int k, bool broadcastB, bool ta, bool tb, float alpha, float beta, MatMulAlgorithm algorithm)
    {
        var shape = new MatMulShape(batch, m, n, k, ta, tb, broadcastB);
        var a = TestData.Uniform(batch * m * k, 11 + m);
        int bBatch = broadcastB ? 1 : batch;
        var b = TestData.Uniform(bBatch * k * n, 13 + n);
        var c0 = TestData.Uniform(batch * m * n, 17 + k);
        var expected = (float[])c0.Clone();
        MatMulReference.Forward(a, b, expected, shape, alpha, beta);

        int[] aShape = ta ? new[] { k, m } : new[] { m, k };
        int[] bShape = tb ? new[] { n, k } : new[] { k, n };
        int[] cShape = { m, n };
        if (batch > 1)
        {
            aShape = new[] { batch }.Concat(aShape).ToArray();
            cShape = new[] { batch }.Concat(cShape).ToArray();
            if (!broadcastB) bShape = new[] { batch }.Concat(bShape).ToArray();
        }

        if (Device is IlgpuDevice ilgpu) ilgpu.MatMulAlgorithm = algorithm;
        try
        {
            var ta2 = Input("a", a, aShape);
            var tb2 = Input("b", b, bShape);
            var c = beta == 0f ? Output("c", cShape) : Input("c", c0, cShape);
            Ops.MatMul(ta2, tb2, c, ta, tb, alpha, beta);
            Expect(c, expected, Tolerances.Dot(k), $"matmul {algorithm} ta={ta} tb={tb} beta={beta}");
        }
        finally
        {
            if (Device is IlgpuDevice d) d.MatMulAlgorithm = MatMulAlgorithm.Auto;
        }
    }
}
