using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class ElementwiseTests : BackendTest
{
    public ElementwiseTests(string backend)
        : base(backend)
    {
    }

    // Lengths: 1, odd, one past a SIMD width, one past the CPU backend's 4096 chunk.
    private static readonly int[] Lengths = { 1, 7, 33, 4097 };

    [TestCaseSource(nameof(Lengths))]
    public void TanhAndBackward_MatchReference(int n)
    {
        var x = TestData.Uniform(n, 11, -6f, 6f);
        x[0] = 30f; // saturates without overflow
        var dy = TestData.Uniform(n, 12);
        var ey = new float[n];
        ElementwiseReference.Tanh(x, ey);
        var y = Output("y", n);
        Ops.Tanh(Input("x", x, n), y);
        Expect(y, ey, Tolerances.Transcendental, "tanh");
        var edx = new float[n];
        ElementwiseReference.TanhBackward(ey, dy, edx);
        var dx = Output("dx", n);
        Ops.TanhBackward(Input("y_ref", ey, n), Input("dy", dy, n), dx);
        Expect(dx, edx, Tolerances.Elementwise, "tanh backward");
    }

    [TestCase(1, 1, TestName = "{m}_Rows1_Cols1")]
    [TestCase(5, 7, TestName = "{m}_Rows5_Cols7")]
    [TestCase(3, 33, TestName = "{m}_Rows3_Cols33")]
    public void ScaleColumns_MatchesReference_AndWorksInPlace(int rows, int cols)
    {
        var x = TestData.Uniform(rows * cols, 5);
        var c = TestData.Uniform(cols, 6);
        var expected = new float[rows * cols];
        ElementwiseReference.ScaleColumns(x, c, expected);
        var tx = Input("x", x, rows, cols);
        var tc = Input("c", c, cols);
        var y = Output("y", rows, cols);
        Ops.ScaleColumns(tx, tc, y);
        Expect(y, expected, Tolerances.Elementwise, "scale columns");
        Ops.ScaleColumns(tx, tc, tx);
        Expect(tx, expected, Tolerances.Elementwise, "scale columns in place");
        Assert.Throws<ArgumentException>(() => Ops.ScaleColumns(tx, Input("c_short", new float[cols + 1], cols + 1), tx));
    }

    [TestCaseSource(nameof(Lengths))]
    public void AddMulScaleAxpy_MatchReference(int n)
    {
        var a = TestData.Uniform(n, 1);
        var b = TestData.Uniform(n, 2);
        var expected = new float[n];
        var ta = Input("a", a, n);
        var tb = Input("b", b, n);

        ElementwiseReference.Add(a, b, expected);
        var y = Output("y", n);
        Ops.Add(ta, tb, y);
        Expect(y, expected, Tolerances.Elementwise, "add");

        ElementwiseReference.Mul(a, b, expected);
        y = Output("y", n);
        Ops.Mul(ta, tb, y);
        Expect(y, expected, Tolerances.Elementwise, "mul");

        ElementwiseReference.Scale(a, -0.75f, expected);
        y = Output("y", n);
        Ops.Scale(ta, -0.75f, y);
        Expect(y, expected, Tolerances.Elementwise, "scale");

        expected = (float[])b.Clone();
        ElementwiseReference.Axpy(0.3f, a, expected);
        Ops.Axpy(0.3f, ta, tb);
        Expect(tb, expected, Tolerances.Elementwise, "axpy");

        Ops.Add(ta, ta, ta); // in place
        Expect(ta, a.Select(v => v + v).ToArray(), Tolerances.Elementwise, "add in place");
    }

    [TestCaseSource(nameof(Lengths))]
    public void FillCopySum_MatchReference(int n)
    {
        var a = TestData.Uniform(n, 3);
        var y = Output("y", n);
        Ops.Copy(Input("a", a, n), y);
        Expect(y, a, Tolerances.Exact, "copy");
        Ops.Fill(y, 2.5f);
        Expect(y, Enumerable.Repeat(2.5f, n).ToArray(), Tolerances.Exact, "fill");
        var ta = Input("a", a, n);
        Assert.That(Ops.Sum(ta), Is.EqualTo(ElementwiseReference.Sum(a)).Within(1e-5 * n), $"{Backend} sum");
        Assert.That(Ops.SumSquares(ta), Is.EqualTo(ElementwiseReference.SumSquares(a)).Within(1e-5 * n), $"{Backend} sum of squares");
    }

    [TestCaseSource(nameof(Lengths))]
    public void SiluAndSwiGlu_ForwardBackward_MatchReference(int n)
    {
        var x = TestData.Uniform(n, 4, -6f, 6f);
        var u = TestData.Uniform(n, 5);
        var dy = TestData.Uniform(n, 6);
        var tx = Input("x", x, n);
        var tu = Input("up", u, n);
        var tdy = Input("dy", dy, n);

        var e = new float[n];
        ElementwiseReference.Silu(x, e);
        var y = Output("y", n);
        Ops.Silu(tx, y);
        Expect(y, e, Tolerances.Transcendental, "silu");

        ElementwiseReference.SiluBackward(x, dy, e);
        y = Output("dx", n);
        Ops.SiluBackward(tx, tdy, y);
        Expect(y, e, Tolerances.Transcendental, "silu backward");

        ElementwiseReference.SwiGlu(x, u, e);
        y = Output("y", n);
        Ops.SwiGlu(tx, tu, y);
        Expect(y, e, Tolerances.Transcendental, "swiglu");

        var eg = new float[n];
        var eu = new float[n];
        ElementwiseReference.SwiGluBackward(x, u, dy, eg, eu);
        var dg = Output("dgate", n);
        var du = Output("dup", n);
        Ops.SwiGluBackward(tx, tu, tdy, dg, du);
        Expect(dg, eg, Tolerances.Transcendental, "swiglu dgate");
        Expect(du, eu, Tolerances.Transcendental, "swiglu dup");
    }

    [Test]
    public void Add_MismatchedShapes_ErrorNamesBoth()
    {
        var e = Assert.Throws<ArgumentException>(() => Ops.Add(Input("left", new float[6], 2, 3), Input("right", new float[6], 3, 2), Output("sum", 2, 3)))!;
        Assert.That(e.Message, Does.Contain("'left' [2, 3]").And.Contain("'right' [3, 2]"));
    }
}
