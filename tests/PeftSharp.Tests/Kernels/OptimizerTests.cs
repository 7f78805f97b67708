using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Optim;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class OptimizerTests : BackendTest
{
    public OptimizerTests(string backend)
        : base(backend)
    {
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
