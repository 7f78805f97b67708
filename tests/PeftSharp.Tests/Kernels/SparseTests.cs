using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Kernels;

public sealed class SparseTests : BackendTest
{
    public SparseTests(string backend)
        : base(backend)
    {
    }

    private static int[] Mask(int numel, int nnz, int seed) => Enumerable.Range(0, numel).OrderBy(i => SparseKernels.Uniform(seed, i)).Take(nnz).ToArray();

    [TestCase(1, 1, TestName = "{m}_Numel1_Nnz1")]
    [TestCase(37, 5, TestName = "{m}_Numel37_Nnz5")]
    [TestCase(4099, 300, TestName = "{m}_Numel4099_Nnz300")]
    public void MaskedAdamW_MatchesReference_LeavesUnmaskedEntriesBitIdentical_StateIsPerEntry(int numel, int nnz)
    {
        var p0 = TestData.Uniform(numel, 1);
        var g = TestData.Uniform(numel, 2);
        var idx = Mask(numel, nnz, 3);
        var m0 = TestData.Uniform(nnz, 4, 0f, 0.1f);
        var v0 = TestData.Uniform(nnz, 5, 0f, 0.1f);
        var step = new AdamWStep(1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, 3);
        var ep = (float[])p0.Clone();
        var em = (float[])m0.Clone();
        var ev = (float[])v0.Clone();
        SparseReference.MaskedAdamW(ep, g, idx, em, ev, step.LearningRate, step.Beta1, step.Beta2, step.Epsilon, step.WeightDecay, step.Step);
        var p = Input("p", p0, numel);
        var m = Input("m", m0, nnz);
        var v = Input("v", v0, nnz);
        Ops.MaskedAdamW(p, Input("g", g, numel), Indices("mask", idx), m, v, step);
        // One AdamW update per entry: a handful of roundings on values of size lr.
        Expect(p, ep, (1e-6, 1e-5), "masked adamw p");
        Expect(m, em, Tolerances.Elementwise, "masked adamw m");
        Expect(v, ev, Tolerances.Elementwise, "masked adamw v");
        var got = p.ToArray();
        var masked = idx.ToHashSet();
        for (int i = 0; i < numel; i++)
        {
            if (!masked.Contains(i)) Assert.That(BitConverter.SingleToInt32Bits(got[i]), Is.EqualTo(BitConverter.SingleToInt32Bits(p0[i])), $"unmasked entry {i}");
        }
    }

    [Test]
    public void MaskedSgd_WithMomentum_MatchesTheDenseStepOnTheMaskedEntries()
    {
        const int numel = 50, nnz = 7;
        var p0 = TestData.Uniform(numel, 1);
        var g = TestData.Uniform(numel, 2);
        var idx = Mask(numel, nnz, 5);
        var step = new SgdStep(0.1f, 0.9f, 0.01f, false);
        var p = Input("p", p0, numel);
        var b = Input("b", new float[nnz], nnz);
        var tg = Input("g", g, numel);
        Ops.MaskedSgd(p, tg, Indices("mask", idx), b, step);
        Ops.MaskedSgd(p, tg, Indices("mask2", idx), b, step); // second step uses the buffer
        var expected = (float[])p0.Clone();
        for (int j = 0; j < nnz; j++)
        {
            int i = idx[j];
            double buf = 0, w = p0[i];
            for (int s = 0; s < 2; s++)
            {
                double gi = g[i] + 0.01 * w;
                buf = 0.9 * buf + gi;
                w -= 0.1 * buf;
            }

            expected[i] = (float)w;
        }

        Expect(p, expected, Tolerances.Elementwise, "masked sgd");
    }

    [Test]
    public void ScatterAdd_ApplyThenRemove_RestoresTheWeights_AndGatherReadsTheMask()
    {
        const int numel = 33;
        var w0 = TestData.Uniform(numel, 1);
        var idx = Mask(numel, 9, 7);
        var values = TestData.Uniform(9, 8);
        var w = Input("w", w0, numel);
        var vt = Input("values", values, 9);
        var it = Indices("idx", idx);
        Ops.ScatterAdd(w, it, vt);
        var applied = w.ToArray();
        for (int j = 0; j < 9; j++) Assert.That(applied[idx[j]], Is.EqualTo(w0[idx[j]] + values[j]), $"entry {idx[j]}");
        var gathered = Output("gathered", 9);
        Ops.Gather(w, it, gathered);
        Assert.That(gathered.ToArray(), Is.EqualTo(idx.Select(i => applied[i]).ToArray()));
        Ops.ScatterAdd(w, it, vt, alpha: -1f);
        // (w + d) - d rounds once more than w: within an ulp of |w| + |d| <= 2.
        Expect(w, w0, (2.5e-7, 0), "apply then remove");
        var e = Assert.Throws<ArgumentException>(() => Ops.ScatterAdd(w, Indices("dup", new[] { 1, 2, 1 }), Input("v3", new float[3], 3)))!;
        Assert.That(e.Message, Does.Contain("index 1 appears twice"));
        e = Assert.Throws<ArgumentException>(() => Ops.ScatterAdd(w, Indices("far", new[] { 40 }), Input("v1", new float[1], 1)))!;
        Assert.That(e.Message, Does.Contain("index 40"));
    }

    [Test]
    public void Scatter_SetsTheIndexedEntriesExactly_LeavesTheRestBitIdentical()
    {
        const int numel = 1029;
        var w0 = TestData.Uniform(numel, 21);
        var idx = Mask(numel, 77, 22);
        var values = TestData.Uniform(77, 23);
        var w = Input("w", w0, numel);
        Ops.Scatter(w, Indices("idx", idx), Input("values", values, 77));
        var expected = (float[])w0.Clone();
        for (int j = 0; j < idx.Length; j++) expected[idx[j]] = values[j];
        Assert.That(w.ToArray(), Is.EqualTo(expected));
        Assert.Throws<ArgumentException>(() => Ops.Scatter(w, Indices("dup", new[] { 3, 3 }), Input("v2", new float[2], 2)));
    }

    [Test]
    public void Dare_ZeroDropIsTheIdentity_MatchesReference_AndKeepsTheExpectationAcrossSeeds()
    {
        const int n = 2000;
        var x = TestData.Uniform(n, 1);
        var tx = Input("x", x, n);
        var y = Output("y", n);
        Ops.Dare(tx, y, 0f, seed: 5);
        Assert.That(y.ToArray(), Is.EqualTo(x), "p = 0: identity, bit for bit");
        var expected = new float[n];
        SparseReference.Dare(x, expected, 0.7f, 9);
        Ops.Dare(tx, y, 0.7f, seed: 9);
        Expect(y, expected, Tolerances.Elementwise, "dare p = 0.7");
        Assert.That(y.ToArray().Count(v => v == 0f) / (double)n, Is.EqualTo(0.7).Within(0.04), "fraction dropped");
        // E[y] = x: averaged over 200 seeds, each entry's mean is x within a few standard errors
        // (sd of one draw = |x| sqrt(p / (1 - p)) ~ 1.5 |x|, over 200 draws ~ 0.11 |x|).
        var mean = new double[n];
        for (int s = 0; s < 200; s++)
        {
            Ops.Dare(tx, y, 0.7f, seed: 1000 + s);
            var ys = y.ToArray();
            for (int i = 0; i < n; i++) mean[i] += ys[i] / 200.0;
        }

        double meanError = Enumerable.Range(0, n).Average(i => mean[i] - x[i]);
        Assert.That(Math.Abs(meanError), Is.LessThan(0.02), "no bias over all entries");
        Assert.That(Enumerable.Range(0, n).Count(i => Math.Abs(mean[i] - x[i]) > 0.5 * Math.Abs(x[i]) + 0.05), Is.LessThan(n / 100));
    }

    /// <summary>
    /// Band selection against the sort-based reference: exact (indices, no tolerance). "ties" data has few distinct
    /// magnitudes, both signs and zeros, so the boundary ranks fall inside runs of equal keys and the tie-break by
    /// index decides; 4099 entries span five chunks of 1024.
    /// </summary>
    [TestCase(1, 0, 1, "plain", TestName = "{m}_N1_Top1")]
    [TestCase(37, 0, 5, "plain", TestName = "{m}_N37_Top5")]
    [TestCase(37, 3, 10, "ties", TestName = "{m}_N37_Skip3_Count10_Ties")]
    [TestCase(4099, 0, 300, "plain", TestName = "{m}_N4099_Top300")]
    [TestCase(4099, 41, 4058, "ties", TestName = "{m}_N4099_DropTop41_KeepRest_Ties")]
    [TestCase(4099, 700, 1500, "ties", TestName = "{m}_N4099_Band700to2200_Ties")]
    [TestCase(4099, 17, 2000, "uniform", TestName = "{m}_N4099_SeededRandom")]
    [TestCase(2048, 0, 2048, "ties", TestName = "{m}_N2048_All")]
    public void SelectBand_MatchesSortReference(int n, int skip, int count, string data)
    {
        var x = TestData.Uniform(n, 11, -2f, 2f);
        if (data == "ties") x = x.Select((v, i) => i % 5 == 0 ? 0f : MathF.Round(v * 2f) / 2f).ToArray();
        var score = data == "uniform" ? new SelectScore(SelectScore.Uniform, 1234) : new SelectScore(SelectScore.Magnitude, 0);
        var expected = SelectReference.Band(x, skip, count, score);
        var got = Ops.SelectBand(Input("x", x, n), skip, count, score);
        Assert.That(got, Is.EqualTo(expected));
    }

    [Test]
    public void SelectBand_BandsPartitionTheTensor_EmptyBandAndBadRanks()
    {
        const int n = 1500;
        var x = TestData.Uniform(n, 12).Select(v => MathF.Round(v * 4f)).ToArray(); // 9 distinct values: long runs of ties
        var tx = Input("x", x, n);
        var parts = new[] { (0, 100), (100, 650), (750, 750) }.SelectMany(b => Ops.SelectBand(tx, b.Item1, b.Item2)).ToList();
        Assert.That(parts.Order(), Is.EqualTo(Enumerable.Range(0, n)), "consecutive bands are disjoint and cover every entry");
        Assert.That(Ops.SelectBand(tx, 10, 0), Is.Empty);
        Assert.Throws<ArgumentException>(() => Ops.SelectBand(tx, 1000, 501));
        Assert.Throws<ArgumentException>(() => Ops.SelectBand(tx, -1, 3));
    }

    [Test]
    public void AbsAdd_MatchesReference()
    {
        const int n = 1031;
        var x = TestData.Uniform(n, 13, -3f, 3f);
        var acc0 = TestData.Uniform(n, 14, 0f, 1f);
        var expected = (float[])acc0.Clone();
        PeftSharp.Kernels.Core.ElementwiseReference.AbsAdd(x, expected);
        var acc = Input("acc", acc0, n);
        Ops.AbsAdd(Input("x", x, n), acc);
        Expect(acc, expected, Tolerances.Elementwise, "abs add");
    }

    [TestCase(1, 1, 1, TestName = "{m}_M1_K1_N1")]
    [TestCase(7, 33, 5, TestName = "{m}_M7_K33_N5")]
    [TestCase(9, 20, 17, TestName = "{m}_M9_K20_N17")]
    public void SparseDeltaMixed_MatchesReference_RowsWithoutVariantUntouched(int m, int k, int n)
    {
        var deltas = Enumerable.Range(0, 3).Select(v =>
        {
            var idx = Mask(n * k, Math.Max(1, n * k / (3 + v)), 20 + v);
            return (idx, TestData.Uniform(idx.Length, 30 + v));
        }).ToArray();
        deltas[2] = (Array.Empty<int>(), Array.Empty<float>()); // an empty delta is a variant too
        var rowVariants = Enumerable.Range(0, m).Select(i => i % 4 - 1).ToArray();
        var x = TestData.Uniform(m * k, 3);
        var y0 = TestData.Uniform(m * n, 4);
        var expected = (float[])y0.Clone();
        SparseReference.MixedForward(x, expected, deltas, rowVariants, n, k);
        using var pool = SparseDeltaPool.Create(Device, k, n, deltas.Select((d, v) => new SparseDeltaData($"s{v}", d.Item1, d.Item2)).ToArray());
        var y = Input("y", y0, m, n);
        Ops.SparseDeltaMixed(Input("x", x, m, k), y, pool, Indices("rows", rowVariants));
        Expect(y, expected, Tolerances.Dot(k), "sparse mixed");
        var got = y.ToArray();
        for (int i = 0; i < m; i++)
        {
            if (rowVariants[i] < 0) Assert.That(got.AsSpan(i * n, n).ToArray(), Is.EqualTo(y0.AsSpan(i * n, n).ToArray()), $"row {i}");
        }
    }
}
