using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Optim;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class CrossEntropyTests : BackendTest
{
    public CrossEntropyTests(string backend)
        : base(backend)
    {
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

        // In place, as the model's loss runs it (dlogits overwrites the logits): the same values.
        Ops.CrossEntropyBackward(tl, tt, tl, 1f / counted);
        Expect(tl, ed, Tolerances.Transcendental, "cross-entropy backward in place");
    }

    [Test]
    public void CrossEntropy_TargetOutOfRange_ErrorNamesTarget()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.CrossEntropy(Input("logits", new float[6], 2, 3), Indices("labels", new[] { 0, 3 }), Output("l", 2)))!;
        Assert.That(e.Message, Does.Contain("target 3").And.Contain("'labels'"));
    }
}
