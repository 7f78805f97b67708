using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Kernels.Attention;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class SharedPrefixTests : BackendTest
{
    public SharedPrefixTests(string backend)
        : base(backend)
    {
    }

    [Test]
    public void AttentionMerge_MatchesReference_AndAnEmptySideIsAnExactNoOp()
    {
        const int rows = 7, d = 5;
        var o1 = TestData.Uniform(rows * d, 1);
        var o2 = TestData.Uniform(rows * d, 2);
        var l1 = TestData.Uniform(rows, 3, -3f, 3f);
        var l2 = TestData.Uniform(rows, 4, -3f, 3f);
        l1[1] = float.NegativeInfinity;                       // empty first side
        l2[2] = float.NegativeInfinity;                       // empty second side
        l1[3] = l2[3] = float.NegativeInfinity;               // both empty
        l1[4] = 80f; l2[4] = -80f;                            // one side dominates without overflow
        var eo = new float[rows * d];
        var el = new float[rows];
        AttentionMergeReference.Merge(o1, l1, o2, l2, eo, el, d);
        var to1 = Input("o1", o1, rows, d);
        var tl1 = Input("lse1", l1, rows);
        Ops.AttentionMerge(to1, tl1, Input("o2", o2, rows, d), Input("lse2", l2, rows), to1, tl1); // in place
        // Two exp and a weighted sum per element: elementwise rounding, a few ulp.
        Expect(to1, eo, Tolerances.Transcendental, "merged o");
        var lse = tl1.ToArray();
        Assert.That(lse[3], Is.EqualTo(float.NegativeInfinity));
        Check.Close(lse.Where((_, i) => i != 3).ToArray(), el.Where((_, i) => i != 3).ToArray(), Tolerances.Transcendental, "merged lse");
        var o = to1.ToArray();
        Assert.That(o.AsSpan(1 * d, d).ToArray(), Is.EqualTo(o2.AsSpan(1 * d, d).ToArray()), "empty first side: o2 exactly");
        Assert.That(o.AsSpan(2 * d, d).ToArray(), Is.EqualTo(o1.AsSpan(2 * d, d).ToArray()), "empty second side: o1 exactly");
        Assert.That(o.AsSpan(3 * d, d).ToArray(), Is.All.EqualTo(0f), "both empty: 0");
    }

    /// <summary>(B, S, Ts, H, Hkv, D, level prefix lengths, groups per level per sequence).</summary>
    private static readonly object[] Cases =
    {
        new TestCaseData(3, 2, 2, 4, 2, 8, new[] { 5 }, new[] { new[] { 0, 0, 0 } }).SetName("{m}_OnePrefixForAll_B3_S2_P5"),
        new TestCaseData(2, 1, 4, 2, 1, 5, new[] { 7 }, new[] { new[] { 0, 0 } }).SetName("{m}_DecodeStep_S1_CachedSuffix4_D5"),
        new TestCaseData(2, 3, 3, 2, 2, 4, new[] { 0 }, new[] { new[] { 0, 0 } }).SetName("{m}_EmptyPrefix"),
        new TestCaseData(2, 2, 0, 2, 1, 4, new[] { 3 }, new[] { new[] { 0, 0 } }).SetName("{m}_EmptySuffixKeys_PrefixOnly"),
        new TestCaseData(4, 2, 2, 4, 2, 4, new[] { 3, 2 }, new[] { new[] { 0, 0, 0, 0 }, new[] { 0, 0, 1, -1 } }).SetName("{m}_TwoLevelTree_SystemThenFewShot"),
    };

    private sealed record Setup(float[] Q, float[][] LevelK, float[][] LevelV, float[] SuffixK, float[] SuffixV, float[] DO);

    private static Setup Make(int b, int s, int ts, int h, int hkv, int d, int[] prefix, int[][] groups)
    {
        var lk = new float[prefix.Length][];
        var lv = new float[prefix.Length][];
        for (int l = 0; l < prefix.Length; l++)
        {
            int g = Math.Max(1, groups[l].Max() + 1);
            lk[l] = TestData.Uniform(g * prefix[l] * hkv * d, 10 + l, -2f, 2f);
            lv[l] = TestData.Uniform(g * prefix[l] * hkv * d, 20 + l);
        }

        return new Setup(TestData.Uniform(b * s * h * d, 1, -2f, 2f), lk, lv, TestData.Uniform(b * ts * hkv * d, 2, -2f, 2f),
            TestData.Uniform(b * ts * hkv * d, 3), TestData.Uniform(b * s * h * d, 4));
    }

    /// <summary>Sequence j's keys (or values) laid end to end: its prefix at each level, then its suffix.</summary>
    private static float[] Concat(float[][] levels, float[] suffix, int[] prefix, int[][] groups, int j, int ts, int hkv, int d, out int total)
    {
        var parts = new List<float>();
        for (int l = 0; l < prefix.Length; l++)
        {
            int g = groups[l][j];
            if (g >= 0) parts.AddRange(levels[l].AsSpan(g * prefix[l] * hkv * d, prefix[l] * hkv * d).ToArray());
        }

        parts.AddRange(suffix.AsSpan(j * ts * hkv * d, ts * hkv * d).ToArray());
        total = parts.Count / (hkv * d);
        return parts.ToArray();
    }

    [TestCaseSource(nameof(Cases))]
    public void SharedPrefix_EqualsAttentionOverTheConcatenation_ForwardAndBackward(int b, int s, int ts, int h, int hkv, int d, int[] prefix, int[][] groups)
    {
        var x = Make(b, s, ts, h, hkv, d, prefix, groups);
        var levels = prefix.Select((p, l) => new PrefixLevel(
            Input($"k{l}", x.LevelK[l], x.LevelK[l].Length / Math.Max(1, p * hkv * d) is var g && p > 0 ? g : Math.Max(1, groups[l].Max() + 1), p, hkv, d),
            Input($"v{l}", x.LevelV[l], p > 0 ? x.LevelV[l].Length / (p * hkv * d) : Math.Max(1, groups[l].Max() + 1), p, hkv, d), groups[l])).ToList();
        var sk = Input("suffix_k", x.SuffixK, b, ts, hkv, d);
        var sv = Input("suffix_v", x.SuffixV, b, ts, hkv, d);
        var q = Input("q", x.Q, b, s, h, d);
        var o = Output("o", b, s, h, d);
        var lse = Output("lse", b, s, h);
        Ops.SharedPrefixAttention(q, levels, sk, sv, o, lse);

        // Flat reference per sequence: causal (bottom-right) attention over [prefixes..., suffix].
        var eo = new float[b * s * h * d];
        var el = new float[b * s * h];
        var edq = new float[eo.Length];
        var edk = x.LevelK.Select(a => new float[a.Length]).ToArray();
        var edv = x.LevelV.Select(a => new float[a.Length]).ToArray();
        var edsk = new float[x.SuffixK.Length];
        var edsv = new float[x.SuffixV.Length];
        for (int j = 0; j < b; j++)
        {
            var kc = Concat(x.LevelK, x.SuffixK, prefix, groups, j, ts, hkv, d, out int tk);
            var vc = Concat(x.LevelV, x.SuffixV, prefix, groups, j, ts, hkv, d, out _);
            // With no suffix keys the queries read only prefixes, all of them (nothing of theirs to be causal over).
            var shape = new AttentionShape(1, s, tk, h, hkv, d, causal: ts > 0, (float)(1 / Math.Sqrt(d)));
            var qj = x.Q.AsSpan(j * s * h * d, s * h * d).ToArray();
            var oj = new float[qj.Length];
            var lj = new float[s * h];
            AttentionReference.Forward(qj, kc, vc, oj, lj, shape);
            oj.CopyTo(eo, j * s * h * d);
            lj.CopyTo(el, j * s * h);
            var dqj = new float[qj.Length];
            var dkc = new float[kc.Length];
            var dvc = new float[vc.Length];
            AttentionReference.Backward(qj, kc, vc, oj, lj, x.DO.AsSpan(j * s * h * d, s * h * d), dqj, dkc, dvc, shape);
            dqj.CopyTo(edq, j * s * h * d);
            int at = 0;
            for (int l = 0; l < prefix.Length; l++)
            {
                int g = groups[l][j];
                if (g < 0) continue;
                int n = prefix[l] * hkv * d;
                for (int e = 0; e < n; e++)
                {
                    edk[l][g * n + e] += dkc[at + e]; // a shared prefix's gradient sums over its sequences
                    edv[l][g * n + e] += dvc[at + e];
                }

                at += n;
            }

            Array.Copy(dkc, at, edsk, j * ts * hkv * d, ts * hkv * d);
            Array.Copy(dvc, at, edsv, j * ts * hkv * d, ts * hkv * d);
        }

        Expect(o, eo, Tolerances.Attention, "shared-prefix o");
        var gotL = lse.ToArray();
        for (int i = 0; i < el.Length; i++)
        {
            if (float.IsNegativeInfinity(el[i])) Assert.That(gotL[i], Is.EqualTo(float.NegativeInfinity), $"lse[{i}]");
            else Assert.That(gotL[i], Is.EqualTo(el[i]).Within(Tolerances.Attention.Atol + Tolerances.Attention.Rtol * Math.Abs(el[i])), $"lse[{i}]");
        }

        var dq = Output("dq", b, s, h, d);
        var dks = levels.Select((lv, l) => Output($"dk{l}", lv.Keys.Shape.ToArray())).ToList();
        var dvs = levels.Select((lv, l) => Output($"dv{l}", lv.Values.Shape.ToArray())).ToList();
        var dsk = Output("dsk", b, ts, hkv, d);
        var dsv = Output("dsv", b, ts, hkv, d);
        Ops.SharedPrefixAttentionBackward(q, levels, sk, sv, o, lse, Input("dO", x.DO, b, s, h, d), dq, dks, dvs, dsk, dsv);
        // The decomposition sums a few partial gradients more than the flat pass: twice the attention tolerance.
        var tol = (2 * Tolerances.Attention.Atol, 2 * Tolerances.Attention.Rtol);
        Expect(dq, edq, tol, "dq");
        for (int l = 0; l < prefix.Length; l++)
        {
            Expect(dks[l], edk[l], tol, $"level {l} dK (summed over its sequences)");
            Expect(dvs[l], edv[l], tol, $"level {l} dV");
        }

        Expect(dsk, edsk, tol, "suffix dK");
        Expect(dsv, edsv, tol, "suffix dV");
    }

    [Test]
    public void SharedPrefix_SequencesOfOnePrefixMustBeContiguous()
    {
        var k = Input("k", new float[2 * 3 * 1 * 2], 2, 3, 1, 2);
        var e = Assert.Throws<ArgumentException>(() => Ops.SharedPrefixAttention(
            Input("q", new float[3 * 1 * 1 * 2], 3, 1, 1, 2), new[] { new PrefixLevel(k, k, new[] { 0, 1, 0 }) },
            Input("sk", new float[3 * 2], 3, 1, 1, 2), Input("sv", new float[3 * 2], 3, 1, 1, 2), Output("o", 3, 1, 1, 2), Output("lse", 3, 1, 1)))!;
        Assert.That(e.Message, Does.Contain("prefix 0 must be contiguous"));
    }
}
