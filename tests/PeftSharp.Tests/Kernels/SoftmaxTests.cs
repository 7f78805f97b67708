using NUnit.Framework;
using PeftSharp.Kernels.Core;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Kernels;

public sealed class SoftmaxTests : BackendTest
{
    public SoftmaxTests(string backend)
        : base(backend)
    {
    }

    [TestCase(1, 1, TestName = "Softmax_R1_C1")]
    [TestCase(4, 9, TestName = "Softmax_R4_C9")]
    [TestCase(3, 257, TestName = "Softmax_R3_C257")]
    public void Softmax_ForwardBackward_MatchReference(int rows, int cols)
    {
        var x = TestData.Uniform(rows * cols, 4, -8f, 8f);
        var dy = TestData.Uniform(rows * cols, 5);
        var ey = new float[rows * cols];
        SoftmaxReference.Forward(x, ey, rows, cols);
        var y = Output("y", rows, cols);
        Ops.Softmax(Input("x", x, rows, cols), y);
        Expect(y, ey, Tolerances.Transcendental, "softmax");
        var edx = new float[rows * cols];
        SoftmaxReference.Backward(ey, dy, edx, rows, cols);
        var dx = Output("dx", rows, cols);
        Ops.SoftmaxBackward(Input("y", ey, rows, cols), Input("dy", dy, rows, cols), dx);
        Expect(dx, edx, Tolerances.Transcendental, "softmax backward");
    }
}
