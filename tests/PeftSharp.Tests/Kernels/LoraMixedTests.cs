using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class LoraMixedTests : BackendTest
{
    public LoraMixedTests(string backend)
        : base(backend)
    {
    }

    private static LoraAdapterData Adapter(string name, int rank, int k, int n, int seed, float scale, bool zeroB = false) =>
        new(name, TestData.Uniform(rank * k, seed), zeroB ? new float[n * rank] : TestData.Uniform(n * rank, seed + 1), rank, scale);

    // (M, K, N, ranks): rank 1, ranks that differ inside one batch, K not a multiple of 32, N = 1, one row.
    private static readonly object[] Shapes =
    {
        new TestCaseData(1, 1, 1, new[] { 1 }).SetName("{m}_M1_K1_N1_R1"),
        new TestCaseData(7, 33, 5, new[] { 4, 1, 8 }).SetName("{m}_M7_K33_N5_Ranks4_1_8"),
        new TestCaseData(9, 20, 1, new[] { 2, 16 }).SetName("{m}_M9_K20_N1_Ranks2_16"),
        new TestCaseData(12, 65, 19, new[] { 3, 3, 5, 7 }).SetName("{m}_M12_K65_N19_FourAdapters"),
    };

    [TestCaseSource(nameof(Shapes))]
    public void LoraMixed_MatchesReference_RowsWithoutAdapterUntouched(int m, int k, int n, int[] ranks) =>
        CheckMixed(k, n, ranks, Enumerable.Range(0, m).Select(i => i % (ranks.Length + 1) - 1).ToArray()); // includes -1 rows

    /// <summary>
    /// Each adapter's rows side by side, as a batch sorted by adapter sends them: the CPU path reads such runs in place
    /// and adds into y directly; adapter 1's rows are split into two runs, so it takes the gathered path.
    /// </summary>
    [Test]
    public void LoraMixed_RowsInRuns_MatchReference() => CheckMixed(33, 19, new[] { 4, 8, 2 }, new[] { 0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 1 });

    private void CheckMixed(int k, int n, int[] ranks, int[] rowAdapters)
    {
        int m = rowAdapters.Length;
        var adapters = ranks.Select((r, i) => Adapter($"a{i}", r, k, n, 10 * i + 1, 0.5f + i)).ToList();
        var x = TestData.Uniform(m * k, 3);
        var y0 = TestData.Uniform(m * n, 4);
        var expected = (float[])y0.Clone();
        var aPool = adapters.SelectMany(a => a.A).ToArray();
        var bPool = adapters.SelectMany(a => a.B).ToArray();
        var aOff = new int[ranks.Length];
        var bOff = new int[ranks.Length];
        for (int i = 1; i < ranks.Length; i++)
        {
            aOff[i] = aOff[i - 1] + ranks[i - 1] * k;
            bOff[i] = bOff[i - 1] + n * ranks[i - 1];
        }

        LoraReference.MixedForward(x, expected, aPool, bPool, aOff, bOff, ranks, adapters.Select(a => a.Scale).ToArray(), rowAdapters, new LoraBatchShape(m, k, n, ranks.Max()));
        using var pool = LoraAdapterPool.Create(Device, k, n, adapters);
        var y = Input("y", y0, m, n);
        Ops.LoraMixed(Input("x", x, m, k), y, pool, Indices("row_adapters", rowAdapters));
        Expect(y, expected, Tolerances.Dot(k + ranks.Max()), "mixed lora");
        var result = y.ToArray();
        for (int i = 0; i < m; i++)
        {
            if (rowAdapters[i] == -1) Assert.That(result.AsSpan(i * n, n).ToArray(), Is.EqualTo(y0.AsSpan(i * n, n).ToArray()), $"{Backend} row {i} has no adapter");
        }
    }

    [TestCaseSource(nameof(Shapes))]
    public void LoraMixedBackward_MatchesReference_ManyAdaptersTrainedInOneBatch(int m, int k, int n, int[] ranks)
    {
        var adapters = ranks.Select((r, i) => Adapter($"a{i}", r, k, n, 10 * i + 1, 0.5f + i)).ToList();
        var rowAdapters = Enumerable.Range(0, m).Select(i => i % (ranks.Length + 1) - 1).ToArray();
        var x = TestData.Uniform(m * k, 3);
        var dy = TestData.Uniform(m * n, 5);
        using var pool = LoraAdapterPool.Create(Device, k, n, adapters);
        var aPool = adapters.SelectMany(a => a.A).ToArray();
        var bPool = adapters.SelectMany(a => a.B).ToArray();
        var dx0 = TestData.Uniform(m * k, 6);
        var da0 = TestData.Uniform(aPool.Length, 7);
        var db0 = TestData.Uniform(bPool.Length, 8);
        var edx = (float[])dx0.Clone();
        var eda = (float[])da0.Clone();
        var edb = (float[])db0.Clone();
        LoraReference.MixedBackward(x, dy, aPool, bPool, pool.AOffsetsHost, pool.BOffsetsHost, pool.RanksHost, pool.ScalesHost, rowAdapters, edx, eda, edb,
            new LoraBatchShape(m, k, n, ranks.Max()));
        var dx = Input("dx", dx0, m, k);
        var da = Input("da", da0, aPool.Length);
        var db = Input("db", db0, bPool.Length);
        Ops.LoraMixedBackward(Input("x", x, m, k), Input("dy", dy, m, n), pool, Indices("rows", rowAdapters), dx, da, db);
        // Sums over up to M rows of K- or N-long products, accumulated into the given values.
        var tol = Tolerances.Dot(m * Math.Max(k, n));
        Expect(dx, edx, tol, "dx");
        Expect(da, eda, tol, "dA pool");
        Expect(db, edb, tol, "dB pool");
    }

    [Test]
    public void DoraScale_MatchesReference_OnlyDoraRowsChange()
    {
        const int m = 5, n = 7;
        var y0 = TestData.Uniform(m * n, 1);
        var scales = TestData.Uniform(2 * n, 2, 0.5f, 1.5f);
        int[] slots = { 1, -1, 0, 1, -1 };
        var expected = (float[])y0.Clone();
        LoraReference.DoraScale(expected, scales, slots, n);
        var y = Input("y", y0, m, n);
        Ops.DoraScale(y, Input("scales", scales, 2, n), Indices("slots", slots));
        Expect(y, expected, Tolerances.Elementwise, "dora scale");
        Assert.Throws<ArgumentException>(() => Ops.DoraScale(y, Input("s2", scales, 2, n), Indices("bad", new[] { 2, 0, 0, 0, 0 })));
    }

    [Test]
    public void LoraMixed_EqualsEachRowAlone_AndZeroBIsTheBase()
    {
        const int m = 6, k = 10, n = 7;
        var adapters = new[] { Adapter("math", 4, k, n, 1, 2f), Adapter("code", 2, k, n, 5, 0.25f), Adapter("fresh", 8, k, n, 9, 1f, zeroB: true) };
        using var pool = LoraAdapterPool.Create(Device, k, n, adapters);
        var x = TestData.Uniform(m * k, 7);
        var rows = new[] { 0, 1, 2, -1, 1, 0 };
        var batched = Input("y", new float[m * n], m, n);
        Ops.LoraMixed(Input("x", x, m, k), batched, pool, Indices("rows", rows));
        var all = batched.ToArray();
        for (int i = 0; i < m; i++)
        {
            var one = Input("y1", new float[n], 1, n);
            Ops.LoraMixed(Input("x1", x.AsSpan(i * k, k).ToArray(), 1, k), one, pool, Indices("row", new[] { rows[i] }));
            Check.Close(all.AsSpan(i * n, n), one.ToArray(), Tolerances.Dot(k), $"{Backend} row {i} batched vs alone");
            if (rows[i] == 2 || rows[i] == -1) Assert.That(one.ToArray(), Is.All.EqualTo(0f), "B = 0 (or no adapter) adds nothing to the base");
        }

        // The fused path equals the unfused formula with dense matmuls: (x A^T) B^T scaled.
        var a0 = adapters[0];
        var t = new float[m * 4];
        MatMulReference.Forward(x, a0.A, t, new MatMulShape(1, m, 4, k, false, true, true));
        var d = new float[m * n];
        MatMulReference.Forward(t, a0.B, d, new MatMulShape(1, m, n, 4, false, true, true), alpha: a0.Scale);
        Check.Close(all.AsSpan(0, n), d.AsSpan(0, n), Tolerances.Dot(k), $"{Backend} row 0 against x A^T B^T");
    }

    [Test]
    public void LoraPool_BadShapesAndIndices_ListEveryOffender()
    {
        var e = Assert.Throws<ArgumentException>(() => LoraAdapterPool.Create(Device, 8, 4, new[]
        {
            new LoraAdapterData("ok", new float[16], new float[8], 2, 1f),
            new LoraAdapterData("short_a", new float[15], new float[8], 2, 1f),
            new LoraAdapterData("wide_b", new float[16], new float[9], 2, 1f),
        }))!;
        Assert.That(e.Message, Does.Contain("'short_a' lora_A has 15 values, expected [2, 8]").And.Contain("'wide_b' lora_B has 9 values, expected [4, 2]").And.Not.Contain("'ok'"));
        using var pool = LoraAdapterPool.Create(Device, 8, 4, new[] { new LoraAdapterData("ok", new float[16], new float[8], 2, 1f) });
        var e2 = Assert.Throws<ArgumentException>(() => Ops.LoraMixed(Input("x", new float[16], 2, 8), Input("y", new float[8], 2, 4), pool, Indices("rows", new[] { 0, 3 })))!;
        Assert.That(e2.Message, Does.Contain("adapter index 3"));
        var e3 = Assert.Throws<ArgumentException>(() => Ops.LoraMixed(Input("x", new float[18], 2, 9), Input("y", new float[8], 2, 4), pool, Indices("rows", new[] { 0, 0 })))!;
        Assert.That(e3.Message, Does.Contain("9 input features"));
    }
}

/// <summary>The backward reference is the forward reference's gradient: checked by central differences in double.</summary>
public sealed class LoraMixedReferenceGradientTests
{
    [Test]
    public void MixedBackwardReference_IsTheGradientOfMixedForward()
    {
        const int m = 5, k = 6, n = 4;
        int[] ranks = { 2, 3 };
        var s = new LoraBatchShape(m, k, n, 3);
        var aPool = TestData.Uniform(2 * k + 3 * k, 1);
        var bPool = TestData.Uniform(n * 2 + n * 3, 2);
        int[] aOff = { 0, 2 * k }, bOff = { 0, n * 2 };
        float[] scales = { 0.7f, 1.3f };
        int[] rows = { 0, -1, 1, 1, 0 };
        var x = TestData.Uniform(m * k, 3);
        var dy = TestData.Uniform(m * n, 4);
        double Loss(float[] xv, float[] av, float[] bv)
        {
            var y = new float[m * n];
            LoraReference.MixedForward(xv, y, av, bv, aOff, bOff, ranks, scales, rows, s);
            return y.Select((v, i) => (double)v * dy[i]).Sum();
        }

        var dx = new float[m * k];
        var da = new float[aPool.Length];
        var db = new float[bPool.Length];
        LoraReference.MixedBackward(x, dy, aPool, bPool, aOff, bOff, ranks, scales, rows, dx, da, db, s);
        const float h = 1e-2f;
        foreach (var (name, values, grad) in new[] { ("x", x, dx), ("A", aPool, da), ("B", bPool, db) })
        {
            for (int i = 0; i < values.Length; i += 3)
            {
                float keep = values[i];
                values[i] = keep + h;
                double lp = Loss(x, aPool, bPool);
                values[i] = keep - h;
                double lm = Loss(x, aPool, bPool);
                values[i] = keep;
                // The loss is linear in each of x, A, B separately, so central differences are exact up to fp32 rounding.
                Assert.That(grad[i], Is.EqualTo((lp - lm) / (2 * h)).Within(2e-3), $"{name}[{i}]");
            }
        }
    }
}
