using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Optim;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class LossEmbeddingOptimizerTests : BackendTest
{
    public LossEmbeddingOptimizerTests(string backend)
        : base(backend)
    {
    }

    [TestCase(1, 1, 1, TestName = "Embedding_N1_V1_D1")]
    [TestCase(9, 5, 3, TestName = "Embedding_N9_V5_D3_RepeatedIds")]
    [TestCase(4, 300, 17, TestName = "Embedding_N4_V300_D17_MostRowsUnused")]
    public void Embedding_ForwardAndScatterAdd_MatchReference(int tokens, int vocab, int dim)
    {
        var ids = TestData.Ints(tokens, 7, vocab);
        var table = TestData.Uniform(vocab * dim, 8);
        var dy = TestData.Uniform(tokens * dim, 9);
        var tids = Indices("ids", ids);
        var e = new float[tokens * dim];
        EmbeddingReference.Forward(ids, table, e, dim);
        var y = Output("y", tokens, dim);
        Ops.Embedding(tids, Input("table", table, vocab, dim), y);
        Expect(y, e, Tolerances.Exact, "embedding");

        var ed = new float[vocab * dim];
        EmbeddingReference.Backward(ids, dy, ed, dim);
        var dt = Output("dtable", vocab, dim);
        Ops.EmbeddingBackward(tids, Input("dy", dy, tokens, dim), dt);
        Expect(dt, ed, Tolerances.Dot(tokens), "embedding backward");
    }

    [Test]
    public void Embedding_IdOutOfRange_ErrorNamesIdAndTable()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.Embedding(Indices("tokens", new[] { 0, 5 }), Input("embed", new float[10], 5, 2), Output("y", 2, 2)))!;
        Assert.That(e.Message, Does.Contain("id 5").And.Contain("'embed' [5, 2]"));
    }

    [TestCase(1, 1, TestName = "CrossEntropy_N1_V1")]
    [TestCase(6, 11, TestName = "CrossEntropy_N6_V11_WithIgnored")]
    [TestCase(3, 1000, TestName = "CrossEntropy_N3_V1000")]
    public void CrossEntropy_ForwardBackward_MatchReference(int rows, int vocab)
    {
        var logits = TestData.Uniform(rows * vocab, 10, -5f, 5f);
        var targets = TestData.Ints(rows, 11, vocab);
        if (rows > 2) targets[1] = -100;
        var el = new float[rows];
        CrossEntropyReference.Forward(logits, targets, el, vocab, -100);
        var tl = Input("logits", logits, rows, vocab);
        var tt = Indices("targets", targets);
        var losses = Output("losses", rows);
        int counted = Ops.CrossEntropy(tl, tt, losses);
        Assert.That(counted, Is.EqualTo(targets.Count(t => t != -100)));
        Expect(losses, el, Tolerances.Attention, "cross-entropy");

        var ed = new float[rows * vocab];
        CrossEntropyReference.Backward(logits, targets, ed, vocab, -100, 1f / counted);
        var d = Output("dlogits", rows, vocab);
        Ops.CrossEntropyBackward(tl, tt, d, 1f / counted);
        Expect(d, ed, Tolerances.Transcendental, "cross-entropy backward");
    }

    [Test]
    public void CrossEntropy_TargetOutOfRange_ErrorNamesTarget()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.CrossEntropy(Input("logits", new float[6], 2, 3), Indices("labels", new[] { 0, 3 }), Output("l", 2)))!;
        Assert.That(e.Message, Does.Contain("target 3").And.Contain("'labels'"));
    }

    [TestCase(1, TestName = "AdamW_N1")]
    [TestCase(4099, TestName = "AdamW_N4099")]
    public void AdamW_ThreeSteps_MatchReference(int n)
    {
        var p = TestData.Uniform(n, 12);
        var m = new float[n];
        var v = new float[n];
        var tp = Input("p", p, n);
        var tm = Input("m", m, n);
        var tv = Input("v", v, n);
        for (int step = 1; step <= 3; step++)
        {
            var g = TestData.Uniform(n, 20 + step);
            var s = new AdamWStep(1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, step);
            OptimizerReference.AdamW(p, g, m, v, s);
            Ops.AdamW(tp, Input("g", g, n), tm, tv, s);
        }

        // The update divides by sqrt(v) + eps, which amplifies fp32 rounding of tiny second moments.
        Expect(tp, p, (1e-5, 1e-4), "adamw p");
        Expect(tm, m, Tolerances.Elementwise, "adamw m");
        Expect(tv, v, Tolerances.Elementwise, "adamw v");
    }

    [TestCase(0f, false, TestName = "Sgd_Plain")]
    [TestCase(0.9f, false, TestName = "Sgd_Momentum")]
    [TestCase(0.9f, true, TestName = "Sgd_Nesterov")]
    public void Sgd_ThreeSteps_MatchReference(float momentum, bool nesterov)
    {
        const int n = 37;
        var p = TestData.Uniform(n, 13);
        var buf = new float[n];
        var tp = Input("p", p, n);
        var tb = momentum != 0f ? Input("buf", buf, n) : null;
        for (int step = 1; step <= 3; step++)
        {
            var g = TestData.Uniform(n, 30 + step);
            var s = new SgdStep(0.1f, momentum, 0.01f, nesterov);
            OptimizerReference.Sgd(p, g, buf, s);
            Ops.Sgd(tp, Input("g", g, n), tb, s);
        }

        Expect(tp, p, Tolerances.Elementwise, "sgd p");
        if (tb != null) Expect(tb, buf, Tolerances.Elementwise, "sgd momentum");
    }

    [Test]
    public void ClipGlobalNorm_ScalesToMaxNorm()
    {
        var a = Input("a", new[] { 3f, 0f }, 2);
        var b = Input("b", new[] { 4f }, 1);
        double norm = Ops.ClipGlobalNorm(new[] { a, b }, 1.0);
        Assert.That(norm, Is.EqualTo(5.0).Within(1e-6));
        Assert.That(Ops.GlobalNorm(new[] { a, b }), Is.EqualTo(1.0).Within(1e-5));
    }
}
