using NUnit.Framework;
using PeftSharp.Engine.Ilgpu;
using PeftSharp.Kernels.Attention;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class AttentionTests : BackendTest
{
    public AttentionTests(string backend)
        : base(backend)
    {
    }

    // (B, Tq, Tk, H, Hkv, D, causal): T = 1, Hkv < H, Tq != Tk (decode over a cache), queries that see no key
    // (causal with Tq > Tk), empty key set, blocks crossing the CPU backend's 64-row query block.
    private static readonly object[] Shapes =
    {
        new TestCaseData(1, 1, 1, 1, 1, 1, true).SetName("{m}_B1_Tq1_Tk1_H1_D1"),
        new TestCaseData(2, 5, 5, 4, 2, 8, true).SetName("{m}_B2_T5_H4_Hkv2_D8_Causal"),
        new TestCaseData(1, 6, 6, 3, 3, 5, false).SetName("{m}_B1_T6_H3_D5_Full"),
        new TestCaseData(2, 1, 9, 4, 1, 6, true).SetName("{m}_B2_Tq1_Tk9_H4_Hkv1_Decode"),
        new TestCaseData(1, 4, 7, 2, 1, 4, true).SetName("{m}_B1_Tq4_Tk7_Causal"),
        new TestCaseData(1, 6, 3, 2, 2, 4, true).SetName("{m}_B1_Tq6_Tk3_SomeQueriesSeeNothing"),
        new TestCaseData(1, 3, 0, 2, 1, 4, false).SetName("{m}_B1_Tq3_Tk0_EmptyKeys"),
        new TestCaseData(1, 70, 70, 2, 1, 8, true).SetName("{m}_B1_T70_H2_Hkv1_D8_CrossesQueryBlock"),
        // The ILGPU tiled kernel: D at its limit over keys that split into tiles and a partial last tile; more query
        // rows (Tq x G) than one group of 32, causal across tile edges; D past its limit (per-row kernel under Auto).
        new TestCaseData(2, 1, 300, 4, 2, 128, true).SetName("{m}_B2_Tq1_Tk300_H4_Hkv2_D128_DecodeOverLongCache"),
        new TestCaseData(1, 20, 45, 4, 1, 3, true).SetName("{m}_B1_Tq20_Tk45_H4_Hkv1_D3_RowsPastOneGroup"),
        new TestCaseData(1, 2, 5, 2, 1, 130, false).SetName("{m}_B1_Tq2_Tk5_D130_PastTheTiles"),
        // Splits: four of 160 keys, the last one short and partly masked; and causal rows that see no key of a split.
        new TestCaseData(1, 3, 520, 2, 1, 4, true).SetName("{m}_B1_Tq3_Tk520_D4_FourSplits"),
        new TestCaseData(1, 300, 300, 2, 1, 4, true).SetName("{m}_B1_T300_D4_EarlyRowsSeeOneSplit"),
    };

    /// <summary>
    /// The attention kernels a device has: on ILGPU devices the per-row kernels, the tiled ones, and the tiled ones
    /// with the forward's keys split across as many groups as they allow (merged by log-sum-exp); elsewhere the
    /// device's own.
    /// </summary>
    private IEnumerable<(string Name, Action Select)> Kernels(int d)
    {
        if (Device is not IlgpuDevice ilgpu)
        {
            yield return ("", () => { });
            yield break;
        }

        yield return ("per-row kernel", () => (ilgpu.AttentionAlgorithm, ilgpu.AttentionTargetGroups) = (AttentionAlgorithm.PerRow, 0));
        if (d > TiledAttentionKernels.MaxD) yield break;
        yield return ("tiled kernel", () => (ilgpu.AttentionAlgorithm, ilgpu.AttentionTargetGroups) = (AttentionAlgorithm.Tiled, 0));
        yield return ("tiled kernel, keys split", () => (ilgpu.AttentionAlgorithm, ilgpu.AttentionTargetGroups) = (AttentionAlgorithm.Tiled, 1 << 20));
    }

    [TearDown]
    public void DefaultKernels()
    {
        if (Device is IlgpuDevice ilgpu) (ilgpu.AttentionAlgorithm, ilgpu.AttentionTargetGroups) = (AttentionAlgorithm.Auto, 0);
    }

    // (B, Tq, Tk, H, Hkv, D, W) with a causal sliding window W: a window of one (each query sees itself), decode over
    // a cache longer than the window, queries before any key, a window crossing the CPU backend's query blocks and the
    // tiled kernels' key tiles, and key splits that some rows see nothing of.
    private static readonly object[] WindowShapes =
    {
        new TestCaseData(1, 9, 9, 2, 1, 4, 3).SetName("{m}_B1_T9_W3"),
        new TestCaseData(1, 4, 10, 2, 1, 4, 1).SetName("{m}_B1_Tq4_Tk10_W1_OnlyItself"),
        new TestCaseData(2, 1, 12, 4, 2, 8, 5).SetName("{m}_B2_Tq1_Tk12_W5_DecodePastTheWindow"),
        new TestCaseData(1, 6, 3, 2, 2, 4, 2).SetName("{m}_B1_Tq6_Tk3_W2_SomeQueriesSeeNothing"),
        new TestCaseData(1, 100, 100, 2, 1, 8, 40).SetName("{m}_B1_T100_W40_CrossesBlocksAndTiles"),
        new TestCaseData(1, 2, 330, 2, 1, 4, 100).SetName("{m}_B1_Tq2_Tk330_W100_SplitsOutsideTheWindow"),
    };

    [TestCaseSource(nameof(Shapes))]
    public void Attention_ForwardBackward_MatchReference(int b, int tq, int tk, int h, int hkv, int d, bool causal) =>
        ForwardBackwardMatchReference(b, tq, tk, h, hkv, d, causal, window: 0);

    [TestCaseSource(nameof(WindowShapes))]
    public void SlidingWindowAttention_ForwardBackward_MatchReference(int b, int tq, int tk, int h, int hkv, int d, int window) =>
        ForwardBackwardMatchReference(b, tq, tk, h, hkv, d, causal: true, window);

    /// <summary>A window that reaches every key is plain causal attention; a window of one returns each query's own value.</summary>
    [Test]
    public void SlidingWindow_Identities()
    {
        var q = TestData.Uniform(2 * 7 * 2 * 4, 1, -2f, 2f);
        var k = TestData.Uniform(2 * 7 * 1 * 4, 2, -2f, 2f);
        var v = TestData.Uniform(2 * 7 * 1 * 4, 3);
        (float[] O, float[] Lse) Run(int window)
        {
            var o = Output("o", 2, 7, 2, 4);
            var lse = Output("lse", 2, 7, 2);
            Ops.Attention(Input("q", q, 2, 7, 2, 4), Input("k", k, 2, 7, 1, 4), Input("v", v, 2, 7, 1, 4), o, lse, causal: true, window: window);
            return (o.ToArray(), lse.ToArray());
        }

        var full = Run(0);
        Assert.That(Run(7).O, Is.EqualTo(full.O), "W = T: every causal key");
        var own = Run(1).O;
        for (int b = 0; b < 2; b++)
        for (int i = 0; i < 7; i++)
        for (int h = 0; h < 2; h++)
        for (int d = 0; d < 4; d++)
        {
            Assert.That(own[((b * 7 + i) * 2 + h) * 4 + d], Is.EqualTo(v[(b * 7 + i) * 4 + d]).Within(1e-6f), "W = 1: the query's own value");
        }

        Assert.That(Run(3).O, Is.Not.EqualTo(full.O).Within(1e-4f), "a window short of T changes the output");
        Assert.Throws<ArgumentException>(() => Ops.Attention(Input("q", q, 2, 7, 2, 4), Input("k", k, 2, 7, 1, 4), Input("v", v, 2, 7, 1, 4), Output("o", 2, 7, 2, 4),
            Output("lse", 2, 7, 2), causal: false, window: 3), "a window needs causal attention");
    }

    private void ForwardBackwardMatchReference(int b, int tq, int tk, int h, int hkv, int d, bool causal, int window)
    {
        var s = new AttentionShape(b, tq, tk, h, hkv, d, causal, (float)(1 / Math.Sqrt(d)), window);
        var q = TestData.Uniform(b * tq * h * d, 1, -2f, 2f);
        var k = TestData.Uniform(b * tk * hkv * d, 2, -2f, 2f);
        var v = TestData.Uniform(b * tk * hkv * d, 3);
        var dO = TestData.Uniform(b * tq * h * d, 4);
        var eo = new float[q.Length];
        var el = new float[b * h * tq];
        AttentionReference.Forward(q, k, v, eo, el, s);
        var edq = new float[q.Length];
        var edk = new float[k.Length];
        var edv = new float[v.Length];
        AttentionReference.Backward(q, k, v, eo, el, dO, edq, edk, edv, s);
        var tq2 = Input("q", q, b, tq, h, d);
        var tk2 = Input("k", k, b, tk, hkv, d);
        var tv = Input("v", v, b, tk, hkv, d);
        foreach (var (name, select) in Kernels(d))
        {
            select();
            var o = Output("o", b, tq, h, d);
            var lse = Output("lse", b, tq, h);
            Ops.Attention(tq2, tk2, tv, o, lse, causal, window: window);
            Expect(o, eo, Tolerances.Attention, $"attention o {name}");
            Expect(lse, el, Tolerances.Attention, $"attention lse {name}");

            var dq = Output("dq", b, tq, h, d);
            var dk = Output("dk", b, tk, hkv, d);
            var dv = Output("dv", b, tk, hkv, d);
            Ops.AttentionBackward(tq2, tk2, tv, Input("o", eo, b, tq, h, d), Input("lse", el, b, tq, h), Input("dO", dO, b, tq, h, d), dq, dk, dv, causal, window: window);
            Expect(dq, edq, Tolerances.Attention, $"attention dq {name}");
            Expect(dk, edk, Tolerances.Attention, $"attention dk {name}");
            Expect(dv, edv, Tolerances.Attention, $"attention dv {name}");
        }
    }

    [Test]
    public void Attention_GroupedHeads_EqualRepeatedKeyValueHeads()
    {
        // Identity: GQA with Hkv = 1 equals full multi-head attention with the key/value head copied H times.
        const int b = 1, t = 4, h = 3, d = 4;
        var q = TestData.Uniform(b * t * h * d, 5);
        var k = TestData.Uniform(b * t * d, 6);
        var v = TestData.Uniform(b * t * d, 7);
        var kRep = new float[b * t * h * d];
        var vRep = new float[b * t * h * d];
        for (int j = 0; j < t; j++)
        for (int hh = 0; hh < h; hh++)
        {
            Array.Copy(k, j * d, kRep, (j * h + hh) * d, d);
            Array.Copy(v, j * d, vRep, (j * h + hh) * d, d);
        }

        var o1 = Output("o_gqa", b, t, h, d);
        var o2 = Output("o_mha", b, t, h, d);
        Ops.Attention(Input("q", q, b, t, h, d), Input("k", k, b, t, 1, d), Input("v", v, b, t, 1, d), o1, Output("l1", b, h, t), true);
        Ops.Attention(Input("q", q, b, t, h, d), Input("k", kRep, b, t, h, d), Input("v", vRep, b, t, h, d), o2, Output("l2", b, h, t), true);
        Check.Close(o1.ToArray(), o2.ToArray(), Tolerances.Attention, $"{Backend} gqa vs repeated heads");
    }

    [Test]
    public void Attention_HeadsNotMultipleOfKvHeads_ClearError()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.Attention(
            Input("q", new float[3 * 2], 1, 1, 3, 2), Input("k", new float[4], 1, 1, 2, 2), Input("v", new float[4], 1, 1, 2, 2),
            Output("o", 1, 1, 3, 2), Output("lse", 1, 3, 1), true))!;
        Assert.That(e.Message, Does.Contain("H = 3").And.Contain("Hkv = 2"));
    }
}
