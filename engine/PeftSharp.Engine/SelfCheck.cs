using System.Diagnostics;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Engine;

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

        // The variant families: a row per adapter / delta (and rows with none), shared-prefix merge, mask selection.
        var rowVariants = new[] { 0, -1, 1, 1, 0, -1, 1 };
        // x (7, K) and y (7, N) from seeds; the reference adds each row's delta to a copy of y, the device to y itself.
        double Mixed(int k, int n, int seed, Action<float[], float[]> reference, Action<Tensor, Tensor, IndexTensor> run)
        {
            var x = Uniform(7 * k, seed);
            var y = Uniform(7 * n, seed + 1);
            var expected = (float[])y.Clone();
            reference(x, expected);
            using var tx = device.FromArray("x", x, 7, k);
            using var ty = device.FromArray("y", y, 7, n);
            using var rows = device.FromIndices("rows", rowVariants);
            run(tx, ty, rows);
            return MaxError(ty.ToArray(), expected);
        }

        results.Add(Measure("lora mixed", "M=7 K=33 N=19 ranks 3,5", 1e-4, () =>
        {
            var adapters = new[] { new LoraAdapterData("a", Uniform(3 * 33, 9), Uniform(19 * 3, 10), 3, 0.5f), new LoraAdapterData("b", Uniform(5 * 33, 11), Uniform(19 * 5, 12), 5, 2f) };
            using var pool = LoraAdapterPool.Create(device, 33, 19, adapters);
            return Mixed(33, 19, 13,
                (x, y) => LoraReference.MixedForward(x, y, adapters.SelectMany(a => a.A).ToArray(), adapters.SelectMany(a => a.B).ToArray(), new[] { 0, 3 * 33 }, new[] { 0, 19 * 3 },
                    new[] { 3, 5 }, new[] { 0.5f, 2f }, rowVariants, new LoraBatchShape(7, 33, 19, 5)),
                (x, y, rows) => ops.LoraMixed(x, y, pool, rows));
        }));

        results.Add(Measure("1-bit mixed", "M=7 K=65 N=19, 2 deltas", 1e-4, () =>
        {
            var deltas = new[] { new BitDeltaData("a", new[] { BitDeltaReference.Pack(Uniform(19 * 65, 15), 19, 65) }, new[] { 0.3f }), new BitDeltaData("b",
                new[] { BitDeltaReference.Pack(Uniform(19 * 65, 16), 19, 65) }, new[] { 0.7f }) };
            using var pool = BitDeltaPool.Create(device, 65, 19, deltas);
            return Mixed(65, 19, 17,
                (x, y) => BitDeltaReference.MixedForward(x, y, deltas.SelectMany(d => d.Signs).SelectMany(w => w).ToArray(), new[] { 0.3f, 0.7f }, new[] { 0, 1 }, new[] { 1, 1 },
                    rowVariants, new BitDeltaShape(7, 65, 19)),
                (x, y, rows) => ops.BitDeltaMixed(x, y, pool, rows));
        }));

        results.Add(Measure("attention merge", "prefix 9 + suffix 5 = full 14, H=4 Hkv=2 D=16", 1e-4, () =>
        {
            // Attention over [prefix, suffix] computed as two partial passes merged by log-sum-exp equals the whole.
            var q = Uniform(5 * 4 * 16, 19);
            var k = Uniform(14 * 2 * 16, 20);
            var v = Uniform(14 * 2 * 16, 21);
            var full = new float[q.Length];
            var fullLse = new float[5 * 4];
            AttentionReference.Forward(q, k, v, full, fullLse, new AttentionShape(1, 5, 14, 4, 2, 16, true, 0.25f));
            using var tq = device.FromArray("q", q, 1, 5, 4, 16);
            using var tk = device.FromArray("k", k, 1, 14, 2, 16);
            using var tv = device.FromArray("v", v, 1, 14, 2, 16);
            using var o1 = device.Zeros("o_prefix", 1, 5, 4, 16);
            using var l1 = device.Zeros("lse_prefix", 1, 5, 4);
            using var o2 = device.Zeros("o_suffix", 1, 5, 4, 16);
            using var l2 = device.Zeros("lse_suffix", 1, 5, 4);
            ops.Attention(tq, tk.View(0, 1, 9, 2, 16), tv.View(0, 1, 9, 2, 16), o1, l1, causal: false, scale: 0.25f);
            ops.Attention(tq, tk.View(9 * 2 * 16, 1, 5, 2, 16), tv.View(9 * 2 * 16, 1, 5, 2, 16), o2, l2, causal: true, scale: 0.25f);
            ops.AttentionMerge(o1, l1, o2, l2, o1, l1);
            return Math.Max(MaxError(o1.ToArray(), full), MaxError(l1.ToArray(), fullLse));
        }));

        results.Add(Measure("mask select", "top 300 of 4099 by |x|, with ties", 0, () =>
        {
            var x = Uniform(4099, 22).Select((v, i) => i % 5 == 0 ? 0f : MathF.Round(v * 4f) / 4f).ToArray();
            var expected = SelectReference.Band(x, 41, 300, default);
            using var tx = device.FromArray("x", x, 4099);
            var got = ops.SelectBand(tx, 41, 300);
            return got.SequenceEqual(expected) ? 0 : 1;
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
