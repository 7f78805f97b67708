using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

/// <summary>Packing is plain C#: checked once, for every input size up to three words and a bit.</summary>
public sealed class BitDeltaPackTests
{
    [Test]
    public void PackThenUnpack_IsTheSign_ForEveryInputSize()
    {
        for (int k = 1; k <= 97; k++)
        {
            const int n = 3;
            var delta = TestData.Uniform(n * k, k);
            delta[0] = 0f; // zero is not positive: bit 0, sign -1
            var words = BitDeltaReference.Pack(delta, n, k);
            Assert.That(words, Has.Length.EqualTo(n * ((k + 31) / 32)), $"K = {k}: words");
            for (int r = 0; r < n; r++)
            {
                for (int c = 0; c < k; c++)
                {
                    Assert.That(BitDeltaReference.Sign(words, k, r, c), Is.EqualTo(delta[r * k + c] > 0 ? 1 : -1), $"K = {k} ({r}, {c})");
                }

                // Bits past K stay 0, so a packed file is canonical.
                int w = (k + 31) / 32, used = k - (w - 1) * 32;
                if (used < 32) Assert.That((uint)words[r * w + w - 1] >> used, Is.EqualTo(0u), $"K = {k}: padding bits of row {r}");
            }

            var dense = new float[n * k];
            BitDeltaReference.Decode(words, 1f, 0f, dense, n, k);
            Assert.That(dense, Is.EqualTo(delta.Select(d => d > 0 ? 1f : -1f).ToArray()), $"K = {k}: decode");
        }
    }
}

public sealed class BitDeltaTests : BackendTest
{
    public BitDeltaTests(string backend)
        : base(backend)
    {
    }

    private static BitDeltaData Variant(string name, int rounds, int k, int n, int seed) =>
        new(name,
            Enumerable.Range(0, rounds).Select(j => BitDeltaReference.Pack(TestData.Uniform(n * k, seed + j), n, k)).ToArray(),
            Enumerable.Range(0, rounds).Select(j => 0.5f / (j + 1) + 0.01f * seed).ToArray());

    // (M, K, N, rounds per variant): size 1; K not a multiple of 8 or 32; K a multiple of 8 only; more than four rows
    // of one variant (the CPU path blocks rows by four); residual rounds; rows with no variant throughout. The CPU
    // path's tiles are 16 output features: N = 19, 37 and 40 leave a row-major tail, N = 32 none; K = 100 and 70
    // end inside a word and inside a 4-input table group.
    private static readonly object[] Shapes =
    {
        new TestCaseData(1, 1, 1, new[] { 1 }).SetName("{m}_M1_K1_N1"),
        new TestCaseData(7, 33, 5, new[] { 1, 2 }).SetName("{m}_M7_K33_N5_Rounds1_2"),
        new TestCaseData(13, 24, 3, new[] { 1 }).SetName("{m}_M13_K24_N3_SixRowsOneVariant"),
        new TestCaseData(12, 65, 19, new[] { 3, 1, 1 }).SetName("{m}_M12_K65_N19_ThreeVariants"),
        new TestCaseData(5, 64, 40, new[] { 1, 1, 1, 1 }).SetName("{m}_M5_K64_N40_FourVariants"),
        new TestCaseData(9, 100, 32, new[] { 1, 1 }).SetName("{m}_M9_K100_N32_WholeTiles"),
        new TestCaseData(11, 70, 37, new[] { 2 }).SetName("{m}_M11_K70_N37_FiveRowsTwoRounds"),
    };

    private (BitDeltaPool Pool, BitDeltaData[] Data, int[] First, int[] Rounds) Pool(int k, int n, int[] rounds)
    {
        var data = rounds.Select((r, i) => Variant($"v{i}", r, k, n, 7 * i + 1)).ToArray();
        var first = new int[rounds.Length];
        for (int i = 1; i < rounds.Length; i++) first[i] = first[i - 1] + rounds[i - 1];
        return (Own(BitDeltaPool.Create(Device, k, n, data)), data, first, rounds);
    }

    [TestCaseSource(nameof(Shapes))]
    public void BitDeltaMixed_MatchesReference_RowsWithoutVariantUntouched(int m, int k, int n, int[] rounds)
    {
        var (pool, data, first, _) = Pool(k, n, rounds);
        var rowVariants = Enumerable.Range(0, m).Select(i => i % (rounds.Length + 1) - 1).ToArray();
        var x = TestData.Uniform(m * k, 3);
        var y0 = TestData.Uniform(m * n, 4);
        var expected = (float[])y0.Clone();
        var signs = data.SelectMany(d => d.Signs).SelectMany(s => s).ToArray();
        var scales = data.SelectMany(d => d.Scales).ToArray();
        BitDeltaReference.MixedForward(x, expected, signs, scales, first, rounds, rowVariants, new BitDeltaShape(m, k, n));
        var y = Input("y", y0, m, n);
        Ops.BitDeltaMixed(Input("x", x, m, k), y, pool, Indices("row_variants", rowVariants));
        // Each round is a K-long sum of +-x: the error of a K-long float dot product, times the rounds.
        Expect(y, expected, Tolerances.Dot(k * rounds.Max()), "1-bit mixed");
        var result = y.ToArray();
        for (int i = 0; i < m; i++)
        {
            if (rowVariants[i] == -1) Assert.That(result.AsSpan(i * n, n).ToArray(), Is.EqualTo(y0.AsSpan(i * n, n).ToArray()), $"{Backend} row {i} has no variant");
        }
    }

    [TestCase(1, 1, TestName = "{m}_K1_N1")]
    [TestCase(33, 7, TestName = "{m}_K33_N7")]
    [TestCase(64, 5, TestName = "{m}_K64_N5")]
    [TestCase(40, 33, TestName = "{m}_K40_N33_TilesAndTail")]
    public void BitDeltaDecode_ThenMatMul_EqualsTheFusedProduct_AndMergeUnmergeRestores(int k, int n)
    {
        const int m = 3;
        var (pool, data, _, _) = Pool(k, n, new[] { 2 });
        var dense = Output("delta", n, k);
        Ops.BitDeltaDecode(pool, 0, dense);
        var expectedDense = new float[n * k];
        BitDeltaReference.Decode(data[0].Signs[0], data[0].Scales[0], 0f, expectedDense, n, k);
        BitDeltaReference.Decode(data[0].Signs[1], data[0].Scales[1], 1f, expectedDense, n, k);
        Expect(dense, expectedDense, Tolerances.Elementwise, "decoded delta");

        var x = TestData.Uniform(m * k, 9);
        var viaDense = Output("y_dense", m, n);
        Ops.MatMul(Input("x", x, m, k), dense, viaDense, transposeB: true);
        var fused = Input("y_fused", new float[m * n], m, n);
        Ops.BitDeltaMixed(Input("x2", x, m, k), fused, pool, Indices("rows", new[] { 0, 0, 0 }));
        Expect(fused, viaDense.ToArray(), Tolerances.Dot(2 * k), "fused product vs decode then matmul");

        var w0 = TestData.Uniform(n * k, 11);
        var w = Input("w", w0, n, k);
        Ops.BitDeltaDecode(pool, 0, w, accumulate: true);
        var merged = w.ToArray();
        Check.Close(merged, w0.Zip(expectedDense, (a, b) => a + b).ToArray(), (1e-6, 1e-6), "merged");
        Ops.BitDeltaDecode(pool, 0, w, accumulate: true, factor: -1f);
        // W + d - d rounds twice in fp32 (|W| <= 1, |d| <= 0.75): within 2 ulp of 1.
        Expect(w, w0, (3e-7, 0), "merge then unmerge");
    }

    [Test]
    public void BitDelta_BadShapesAndIndices_NameTheOffender()
    {
        var e = Assert.Throws<ArgumentException>(() => BitDeltaPool.Create(Device, 33, 2, new[] { new BitDeltaData("short", new[] { new int[3] }, new[] { 1f }) }))!;
        Assert.That(e.Message, Does.Contain("'short' round 0 has 3 words, expected [2, 2] = 4"));
        var (pool, _, _, _) = Pool(8, 4, new[] { 1 });
        e = Assert.Throws<ArgumentException>(() => Ops.BitDeltaMixed(Input("x", new float[16], 2, 8), Input("y", new float[8], 2, 4), pool, Indices("rows", new[] { 0, 1 })))!;
        Assert.That(e.Message, Does.Contain("variant index 1"));
        e = Assert.Throws<ArgumentException>(() => Ops.BitDeltaMixed(Input("x2", new float[18], 2, 9), Input("y2", new float[8], 2, 4), pool, Indices("rows2", new[] { 0, 0 })))!;
        Assert.That(e.Message, Does.Contain("9 input features"));
    }
}

/// <summary>
/// The CPU backend's two 1-bit paths (lookup tables on AVX-512, sign masks elsewhere and for the tail features) and its
/// tiled pool layout, checked against the reference on whichever machine runs the suite.
/// </summary>
public sealed class BitDeltaCpuPathTests
{
    [Test]
    public void Arrange_IsAPermutation_ThatWordIndexInverts([Values(1, 15, 16, 17, 40)] int n, [Values(1, 3)] int w)
    {
        const int slots = 2;
        var words = Enumerable.Range(0, slots * n * w).ToArray();
        var arranged = BitDeltaCpu.Arrange(words, n, w);
        Assert.That(arranged.OrderBy(v => v), Is.EqualTo(words), "same words");
        for (int s = 0; s < slots; s++)
        {
            for (int f = 0; f < n; f++)
            {
                for (int c = 0; c < w; c++)
                {
                    Assert.That(arranged[(long)s * n * w + BitDeltaCpu.WordIndex(f, c, n, w)], Is.EqualTo(words[(s * n + f) * w + c]), $"slot {s} feature {f} word {c}");
                }
            }
        }
    }

    // (M, K, N): tiles and a tail; one row per variant and blocks of 4 + 2 + 1 rows; and enough rows at K = 4096
    // (64 KiB of tables each) that the tables are built in two chunks of rows.
    [TestCase(7, 70, 37, 3)]
    [TestCase(15, 33, 48, 2)]
    [TestCase(140, 4096, 16, 3)]
    public void BothPaths_MatchTheReference(int m, int k, int n, int variants)
    {
        var data = Enumerable.Range(0, variants).Select(v => new BitDeltaData($"v{v}",
            new[] { BitDeltaReference.Pack(TestData.Uniform(n * k, 20 + v), n, k), BitDeltaReference.Pack(TestData.Uniform(n * k, 40 + v), n, k) },
            new[] { 0.25f + v, -0.5f })).ToArray();
        var signs = data.SelectMany(d => d.Signs).SelectMany(s => s).ToArray();
        var scales = data.SelectMany(d => d.Scales).ToArray();
        var first = Enumerable.Range(0, variants).Select(v => 2 * v).ToArray();
        var rounds = Enumerable.Repeat(2, variants).ToArray();
        // Variant 0 takes most rows, so its rows form whole blocks of four; row 1 has no variant.
        var rowVariants = Enumerable.Range(0, m).Select(i => i == 1 ? -1 : i % 5 < 3 ? 0 : i % variants).ToArray();
        var x = TestData.Uniform(m * k, 5);
        var y0 = TestData.Uniform(m * n, 6);
        var expected = (float[])y0.Clone();
        var shape = new BitDeltaShape(m, k, n);
        BitDeltaReference.MixedForward(x, expected, signs, scales, first, rounds, rowVariants, shape);
        var arranged = BitDeltaCpu.Arrange(signs, n, shape.W);
        foreach (bool tables in new[] { true, false })
        {
            var y = (float[])y0.Clone();
            BitDeltaCpu.Mixed(x, 0, y, 0, arranged, scales, 0, first, rounds, rowVariants, shape, tables);
            // Two rounds of K-long sums of +-x (the tables add four x's per entry first, the same error order).
            Check.Close(y, expected, Tolerances.Dot(2 * k), $"tables allowed: {tables}");
        }
    }
}
