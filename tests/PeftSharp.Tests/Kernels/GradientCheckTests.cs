using NUnit.Framework;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

/// <summary>
/// Every backward pass against central finite differences of its forward, in double, on tiny shapes. The loss is
/// L = sum(forward(x) * r) for a fixed random r, so the analytic gradient is backward(dy = r). These check the
/// references; the backend tests check every device against the references.
/// </summary>
public sealed class GradientCheckTests
{
    private const double Step = 1e-2;

    [Test]
    public void MatMul_GradientsOfBothInputs()
    {
        const int m = 3, k = 4, n = 5;
        var a = TestData.Uniform(m * k, 1);
        var b = TestData.Uniform(k * n, 2);
        var r = TestData.Uniform(m * n, 3);
        var da = new float[m * k];
        var db = new float[k * n];
        // dA = dC B^T, dB = A^T dC: how Ops.LinearBackward composes matmuls.
        MatMulReference.Forward(r, b, da, new MatMulShape(1, m, k, n, false, true, true));
        MatMulReference.Forward(a, r, db, new MatMulShape(1, k, n, m, true, false, true));
        Func<float[], float[], float[]> f = (x, y) =>
        {
            var c = new float[m * n];
            MatMulReference.Forward(x, y, c, new MatMulShape(1, m, n, k, false, false, true));
            return c;
        };
        Gradient(a, x => f(x, b), r, da, "matmul dA");
        Gradient(b, y => f(a, y), r, db, "matmul dB");
    }

    [Test]
    public void SiluAndSwiGlu_Gradients()
    {
        var x = TestData.Uniform(9, 4, -4f, 4f);
        var u = TestData.Uniform(9, 5);
        var r = TestData.Uniform(9, 6);
        var dx = new float[9];
        ElementwiseReference.SiluBackward(x, r, dx);
        Gradient(x, v => Apply(v, ElementwiseReference.Silu), r, dx, "silu");
        var dg = new float[9];
        var du = new float[9];
        ElementwiseReference.SwiGluBackward(x, u, r, dg, du);
        Gradient(x, g => { var y = new float[9]; ElementwiseReference.SwiGlu(g, u, y); return y; }, r, dg, "swiglu dgate");
        Gradient(u, up => { var y = new float[9]; ElementwiseReference.SwiGlu(x, up, y); return y; }, r, du, "swiglu dup");
    }

    [Test]
    public void Softmax_Gradient()
    {
        const int rows = 3, cols = 5;
        var x = TestData.Uniform(rows * cols, 7, -2f, 2f);
        var r = TestData.Uniform(rows * cols, 8);
        var y = new float[rows * cols];
        SoftmaxReference.Forward(x, y, rows, cols);
        var dx = new float[rows * cols];
        SoftmaxReference.Backward(y, r, dx, rows, cols);
        Gradient(x, v => { var o = new float[rows * cols]; SoftmaxReference.Forward(v, o, rows, cols); return o; }, r, dx, "softmax");
    }

    [Test]
    public void RmsNorm_GradientsOfInputAndWeight()
    {
        const int rows = 3, dim = 6;
        var x = TestData.Uniform(rows * dim, 9, -2f, 2f);
        var w = TestData.Uniform(dim, 10, 0.5f, 1.5f);
        var r = TestData.Uniform(rows * dim, 11);
        var y = new float[rows * dim];
        var rstd = new float[rows];
        RmsNormReference.Forward(x, w, y, rstd, rows, dim, 1e-5f);
        var dx = new float[rows * dim];
        var dw = new float[dim];
        RmsNormReference.Backward(r, x, w, rstd, dx, dw, rows, dim);
        float[] F(float[] xv, float[] wv)
        {
            var o = new float[rows * dim];
            RmsNormReference.Forward(xv, wv, o, new float[rows], rows, dim, 1e-5f);
            return o;
        }

        Gradient(x, v => F(v, w), r, dx, "rmsnorm dx");
        Gradient(w, v => F(x, v), r, dw, "rmsnorm dw");
    }

    [Test]
    public void Rope_GradientIsInverseRotation()
    {
        const int tokens = 3, heads = 2, dim = 6;
        var x = TestData.Uniform(tokens * heads * dim, 12);
        var pos = new[] { 0, 5, 17 };
        var r = TestData.Uniform(x.Length, 13);
        var dx = new float[x.Length];
        RopeReference.Forward(r, pos, dx, tokens, heads, dim, 10000f, inverse: true);
        Gradient(x, v => { var o = new float[v.Length]; RopeReference.Forward(v, pos, o, tokens, heads, dim, 10000f, false); return o; }, r, dx, "rope");
    }

    [TestCase(true, TestName = "Attention_Gradients_CausalGqa")]
    [TestCase(false, TestName = "Attention_Gradients_FullTqLessThanTk")]
    public void Attention_GradientsOfQueriesKeysValues(bool causal)
    {
        int b = 1, tq = causal ? 4 : 2, tk = 4, h = 2, hkv = 1, d = 3;
        var s = new AttentionShape(b, tq, tk, h, hkv, d, causal, 0.7f);
        var q = TestData.Uniform(b * tq * h * d, 14);
        var k = TestData.Uniform(b * tk * hkv * d, 15);
        var v = TestData.Uniform(b * tk * hkv * d, 16);
        var r = TestData.Uniform(q.Length, 17);
        var o = new float[q.Length];
        var lse = new float[b * h * tq];
        AttentionReference.Forward(q, k, v, o, lse, s);
        var dq = new float[q.Length];
        var dk = new float[k.Length];
        var dv = new float[v.Length];
        AttentionReference.Backward(q, k, v, o, lse, r, dq, dk, dv, s);
        float[] F(float[] qv, float[] kv, float[] vv)
        {
            var out1 = new float[q.Length];
            AttentionReference.Forward(qv, kv, vv, out1, new float[lse.Length], s);
            return out1;
        }

        Gradient(q, x => F(x, k, v), r, dq, "attention dq");
        Gradient(k, x => F(q, x, v), r, dk, "attention dk");
        Gradient(v, x => F(q, k, x), r, dv, "attention dv");
    }

    [Test]
    public void Embedding_GradientIsScatterAdd()
    {
        var ids = new[] { 2, 0, 2, 3 };
        const int vocab = 5, dim = 3;
        var table = TestData.Uniform(vocab * dim, 18);
        var r = TestData.Uniform(ids.Length * dim, 19);
        var dt = new float[vocab * dim];
        EmbeddingReference.Backward(ids, r, dt, dim);
        Gradient(table, t => { var y = new float[ids.Length * dim]; EmbeddingReference.Forward(ids, t, y, dim); return y; }, r, dt, "embedding");
    }

    [Test]
    public void CrossEntropy_GradientOfMeanLoss()
    {
        const int rows = 4, vocab = 6;
        var logits = TestData.Uniform(rows * vocab, 20, -3f, 3f);
        var targets = new[] { 1, -100, 5, 0 };
        var r = new[] { 1f / 3 }; // mean over the 3 counted rows
        var d = new float[rows * vocab];
        CrossEntropyReference.Backward(logits, targets, d, vocab, -100, 1f / 3);
        Gradient(logits, l =>
        {
            var losses = new float[rows];
            CrossEntropyReference.Forward(l, targets, losses, vocab, -100);
            return new[] { losses.Sum() };
        }, r, d, "cross-entropy");
    }

    private static float[] Apply(float[] x, SpanAction f)
    {
        var y = new float[x.Length];
        f(x, y);
        return y;
    }

    private delegate void SpanAction(ReadOnlySpan<float> x, Span<float> y);

    /// <summary>Compares analytic[i] with (L(x + h e_i) - L(x - h e_i)) / (2h), L = sum(f(x) * r) in double.</summary>
    private static void Gradient(float[] x, Func<float[], float[]> f, float[] r, float[] analytic, string what)
    {
        var numeric = new float[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            var plus = (float[])x.Clone();
            var minus = (float[])x.Clone();
            plus[i] = (float)(x[i] + Step);
            minus[i] = (float)(x[i] - Step);
            double lp = Loss(f(plus), r), lm = Loss(f(minus), r);
            numeric[i] = (float)((lp - lm) / ((double)plus[i] - minus[i]));
        }

        Check.Close(analytic, numeric, Tolerances.FiniteDifference, what);
    }

    private static double Loss(float[] y, float[] r)
    {
        double acc = 0;
        for (int i = 0; i < y.Length; i++) acc += (double)y[i] * r[i];
        return acc;
    }
}
