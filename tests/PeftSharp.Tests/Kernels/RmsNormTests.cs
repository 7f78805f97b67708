using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class RmsNormTests : BackendTest
{
    public RmsNormTests(string backend)
        : base(backend)
    {
    }

    [TestCase(1, 1, TestName = "RmsNorm_N1_D1")]
    [TestCase(5, 7, TestName = "RmsNorm_N5_D7")]
    [TestCase(3, 64, TestName = "RmsNorm_N3_D64")]
    [TestCase(17, 33, TestName = "RmsNorm_N17_D33")]
    public void RmsNorm_ForwardBackward_MatchReference(int rows, int dim)
    {
        var x = TestData.Uniform(rows * dim, 1, -2f, 2f);
        var w = TestData.Uniform(dim, 2, 0.5f, 1.5f);
        var dy = TestData.Uniform(rows * dim, 3);
        var ey = new float[rows * dim];
        var er = new float[rows];
        RmsNormReference.Forward(x, w, ey, er, rows, dim, 1e-5f);
        var tx = Input("x", x, rows, dim);
        var tw = Input("w", w, dim);
        var y = Output("y", rows, dim);
        var r = Output("rstd", rows);
        Ops.RmsNorm(tx, tw, y, r, 1e-5f);
        Expect(y, ey, Tolerances.Transcendental, "rmsnorm y");
        Expect(r, er, Tolerances.Transcendental, "rmsnorm rstd");

        var edx = new float[rows * dim];
        var edw = new float[dim];
        RmsNormReference.Backward(dy, x, w, er, edx, edw, rows, dim);
        var dx = Output("dx", rows, dim);
        var dw = Output("dw", dim);
        Ops.RmsNormBackward(Input("dy", dy, rows, dim), tx, tw, Input("rstd", er, rows), dx, dw);
        Expect(dx, edx, Tolerances.Dot(dim), "rmsnorm dx");
        Expect(dw, edw, Tolerances.Dot(rows), "rmsnorm dw");
    }
}
