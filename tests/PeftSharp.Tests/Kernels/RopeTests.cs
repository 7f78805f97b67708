using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class RopeTests : BackendTest
{
    public RopeTests(string backend)
        : base(backend)
    {
    }

    [TestCase(1, 1, 2, TestName = "Rope_N1_H1_D2")]
    [TestCase(5, 3, 8, TestName = "Rope_N5_H3_D8")]
    [TestCase(7, 2, 18, TestName = "Rope_N7_H2_D18")]
    public void Rope_ForwardAndInverse_MatchReference(int tokens, int heads, int dim)
    {
        var x = TestData.Uniform(tokens * heads * dim, 6);
        var positions = Enumerable.Range(0, tokens).Select(i => 3 + 29 * i % 190).ToArray(); // offset, shuffled, < 200
        var tp = Indices("positions", positions);
        var tx = Input("x", x, tokens, heads, dim);
        foreach (bool inverse in new[] { false, true })
        {
            var e = new float[x.Length];
            RopeReference.Forward(x, positions, e, tokens, heads, dim, 10000f, inverse);
            var y = Output("y", tokens, heads, dim);
            Ops.Rope(tx, tp, y, 10000f, inverse);
            Expect(y, e, Tolerances.Rope, inverse ? "rope inverse" : "rope");
        }

        // Identity: the inverse rotation undoes the rotation, in place.
        var t = Input("x", x, tokens, heads, dim);
        Ops.Rope(t, tp, t, 500000f);
        Ops.Rope(t, tp, t, 500000f, inverse: true);
        Expect(t, x, Tolerances.Rope, "rope then inverse");
    }

    /// <summary>
    /// The CPU backend keeps one table of cos and sin by position for the last configuration it rotated with; it must
    /// grow when a later call reaches further positions (past its first 256, then past twice that) and be rebuilt when
    /// theta, the head size or the scaling changes. Every call is checked against the reference on every backend.
    /// </summary>
    [Test]
    public void Rope_PositionsGrowAndConfigurationsChange_EachCallMatchesReference()
    {
        const int heads = 2;
        var linear = new RopeScaling { Type = RopeScaling.Linear, Factor = 2f };
        var calls = new (int MaxPosition, float Theta, int Dim, RopeScaling Scaling)[]
        {
            (10, 10000f, 8, default), (300, 10000f, 8, default), (1100, 10000f, 8, default), (50, 10000f, 8, default),
            (50, 500f, 8, default), (50, 500f, 6, default), (50, 500f, 6, linear),
        };
        foreach (var (maxPosition, theta, dim, scaling) in calls)
        {
            var positions = new[] { maxPosition, 0, maxPosition / 2, 1 };
            var x = TestData.Uniform(positions.Length * heads * dim, maxPosition + dim);
            var e = new float[x.Length];
            RopeReference.Forward(x, positions, e, positions.Length, heads, dim, theta, false, scaling);
            var y = Output("y", positions.Length, heads, dim);
            Ops.Rope(Input("x", x, positions.Length, heads, dim), Indices("positions", positions), y, theta, scaling: scaling);
            Expect(y, e, Tolerances.Rope, $"rope up to position {maxPosition}, theta {theta}, D {dim}, scaling {scaling.Type}");
        }

        // Past 65,536 positions the CPU backend tables just this call's tokens instead of caching every position. fp32
        // angles that large are far from the reference's double ones (one ulp of 70,000 is 0.008 rad), so the small
        // positions of the call are checked against it and the large ones by the inverse rotation restoring x.
        var far = new[] { 70_000, 3, 65_536, 1 };
        var xf = TestData.Uniform(far.Length * heads * 8, 99);
        var ef = new float[xf.Length];
        RopeReference.Forward(xf, far, ef, far.Length, heads, 8, 10000f, false);
        var tf = Input("x", xf, far.Length, heads, 8);
        var pf = Indices("positions", far);
        Ops.Rope(tf, pf, tf, 10000f);
        var rotated = tf.ToArray();
        for (int j = 0; j < heads * 8; j++)
        {
            foreach (int row in new[] { 1, 3 })
            {
                int at = row * heads * 8 + j;
                Assert.That(rotated[at], Is.EqualTo(ef[at]).Within(Tolerances.Rope.Atol + Tolerances.Rope.Rtol * Math.Abs(ef[at])), $"{Backend} position {far[row]}, element {j}");
            }
        }

        Ops.Rope(tf, pf, tf, 10000f, inverse: true);
        Expect(tf, xf, Tolerances.Rope, "rope then inverse at positions past 65,536");
    }

    /// <summary>
    /// Scaled rotary frequencies (config.json's rope_scaling) against the reference on every backend: llama3 with Llama
    /// 3.1's settings scaled down to a small original context (64 positions), so D = 32 spans the three bands (kept,
    /// blended, divided), and linear. Positions up to 190.
    /// </summary>
    [TestCase("llama3", TestName = "Rope_Llama3Scaling_MatchesReference")]
    [TestCase("linear", TestName = "Rope_LinearScaling_MatchesReference")]
    public void Rope_Scaled_MatchesReference(string kind)
    {
        const int tokens = 6, heads = 2, dim = 32;
        var scaling = kind == "llama3"
            ? new RopeScaling { Type = RopeScaling.Llama3, Factor = 8f, LowFreqFactor = 1f, HighFreqFactor = 4f, OriginalMaxPositions = 64f }
            : new RopeScaling { Type = RopeScaling.Linear, Factor = 4f };
        var x = TestData.Uniform(tokens * heads * dim, 7);
        var positions = Enumerable.Range(0, tokens).Select(i => 5 + 37 * i % 190).ToArray();
        var tp = Indices("positions", positions);
        foreach (bool inverse in new[] { false, true })
        {
            var e = new float[x.Length];
            RopeReference.Forward(x, positions, e, tokens, heads, dim, 100f, inverse, scaling);
            var y = Output("y", tokens, heads, dim);
            Ops.Rope(Input("x", x, tokens, heads, dim), tp, y, 100f, inverse, scaling);
            Expect(y, e, Tolerances.Rope, $"{kind} rope{(inverse ? " inverse" : "")}");
        }

        if (kind == "llama3")
        {
            // The bands: the highest frequencies are untouched, the lowest divided by the factor, some blended.
            var inv = Enumerable.Range(0, dim / 2).Select(i => Math.Pow(100, -2.0 * i / dim)).ToArray();
            var scaled = inv.Select(v => RopeReference.InvFreq(v, scaling)).ToArray();
            Assert.That(scaled[0], Is.EqualTo(inv[0]));
            Assert.That(scaled[^1], Is.EqualTo(inv[^1] / 8).Within(1e-15));
            Assert.That(Enumerable.Range(0, dim / 2).Any(i => scaled[i] < inv[i] && scaled[i] > inv[i] / 8), "some frequencies are blended");
        }
    }

    [Test]
    public void Rope_BadInput_ClearErrors()
    {
        var x = Input("q", new float[2 * 3 * 5], 2, 3, 5);
        Assert.That(Assert.Throws<ArgumentException>(() => Ops.Rope(x, Indices("pos", new[] { 0, 1 }), x, 10000f))!.Message, Does.Contain("D = 5"));
        var x2 = Input("q", new float[2 * 3 * 4], 2, 3, 4);
        Assert.That(Assert.Throws<ArgumentException>(() => Ops.Rope(x2, Indices("pos", new[] { 0, 1, 2 }), x2, 10000f))!.Message, Does.Contain("'pos' [3]"));
    }
}
