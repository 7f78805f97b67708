using System.Diagnostics;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.Core;

namespace PeftSharp.Engine;

/// <summary>One row of a self-check: an op on a device against its double-precision reference.</summary>
public sealed record SelfCheckResult(string Op, string Shape, double MaxError, double Tolerance, TimeSpan Elapsed)
{
    public bool Passed => MaxError <= Tolerance;
}

/// <summary>
/// A short check that a device's kernels compile and agree with the references: the first thing to run on a new
/// machine or driver (`peft selfcheck`). The full comparison lives in the test suite.
/// </summary>
public static class SelfCheck
{
    public static IReadOnlyList<SelfCheckResult> Run(Device device)
    {
        var results = new List<SelfCheckResult>();
        var ops = device.Ops;

        results.Add(Measure("matmul", "M=33 N=47 K=61, b transposed", 1e-4, () =>
        {
            var s = new MatMulShape(1, 33, 47, 61, false, true, true);
            var a = Uniform(33 * 61, 1);
            var b = Uniform(47 * 61, 2);
            var expected = new float[33 * 47];
            MatMulReference.Forward(a, b, expected, s);
            using var ta = device.FromArray("a", a, 33, 61);
            using var tb = device.FromArray("b", b, 47, 61);
            using var tc = device.Zeros("c", 33, 47);
            ops.MatMul(ta, tb, tc, transposeB: true);
            return MaxError(tc.ToArray(), expected);
        }));

        results.Add(Measure("rmsnorm", "N=9 D=40", 1e-5, () =>
        {
            var x = Uniform(9 * 40, 3);
            var w = Uniform(40, 4);
            var y = new float[9 * 40];
            var r = new float[9];
            RmsNormReference.Forward(x, w, y, r, 9, 40, 1e-5f);
            using var tx = device.FromArray("x", x, 9, 40);
            using var tw = device.FromArray("w", w, 40);
            using var ty = device.Zeros("y", 9, 40);
            using var tr = device.Zeros("rstd", 9);
            ops.RmsNorm(tx, tw, ty, tr, 1e-5f);
            return MaxError(ty.ToArray(), y);
        }));

        results.Add(Measure("attention", "B=2 T=13 H=4 Hkv=2 D=16 causal", 1e-4, () =>
        {
            var s = new AttentionShape(2, 13, 13, 4, 2, 16, true, 0.25f);
            var q = Uniform(2 * 13 * 4 * 16, 5);
            var k = Uniform(2 * 13 * 2 * 16, 6);
            var v = Uniform(2 * 13 * 2 * 16, 7);
            var o = new float[q.Length];
            var lse = new float[2 * 4 * 13];
            AttentionReference.Forward(q, k, v, o, lse, s);
            using var tq = device.FromArray("q", q, 2, 13, 4, 16);
            using var tk = device.FromArray("k", k, 2, 13, 2, 16);
            using var tv = device.FromArray("v", v, 2, 13, 2, 16);
            using var to = device.Zeros("o", 2, 13, 4, 16);
            using var tl = device.Zeros("lse", 2, 13, 4);
            ops.Attention(tq, tk, tv, to, tl, causal: true, scale: 0.25f);
            return Math.Max(MaxError(to.ToArray(), o), MaxError(tl.ToArray(), lse));
        }));

        results.Add(Measure("cross-entropy", "N=7 V=50", 1e-4, () =>
        {
            var logits = Uniform(7 * 50, 8, 3f);
            var targets = new[] { 1, 49, 0, -100, 7, 7, 23 };
            var losses = new float[7];
            CrossEntropyReference.Forward(logits, targets, losses, 50, -100);
            using var tl = device.FromArray("logits", logits, 7, 50);
            using var tt = device.FromIndices("targets", targets);
            using var tloss = device.Zeros("losses", 7);
            ops.CrossEntropy(tl, tt, tloss);
            return MaxError(tloss.ToArray(), losses);
        }));

        return results;
    }

    private static SelfCheckResult Measure(string op, string shape, double tol, Func<double> run)
    {
        var sw = Stopwatch.StartNew();
        double err = run();
        return new SelfCheckResult(op, shape, err, tol, sw.Elapsed);
    }

    private static double MaxError(float[] a, float[] e)
    {
        double m = 0;
        for (int i = 0; i < a.Length; i++)
        {
            double d = float.IsNegativeInfinity(e[i]) && float.IsNegativeInfinity(a[i]) ? 0 : Math.Abs((double)a[i] - e[i]);
            if (double.IsNaN(d)) return double.PositiveInfinity;
            m = Math.Max(m, d);
        }

        return m;
    }

    private static float[] Uniform(int n, int seed, float scale = 1f)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = scale * (2f * (float)rng.NextDouble() - 1f);
        return a;
    }
}
