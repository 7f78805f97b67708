using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>A bias over the rows and its gradient, as products with a column of ones (so every backend runs them).</summary>
internal static class RowBroadcast
{
    /// <summary>y (rows, out) += alpha 1 b^T for b (out).</summary>
    public static void AddToRows(Tensor y, Tensor b, float alpha = 1f)
    {
        using var ones = Ones(y.Device, y.Dim(0));
        y.Device.Ops.MatMul(ones, b.Reshape(1, y.Dim(1)), y, alpha: alpha, beta: 1f);
    }

    /// <summary>grad (out) += alpha dy^T 1: each output's gradient summed over the rows of dy (rows, out).</summary>
    public static void AddColumnSums(Tensor dy, Tensor grad, float alpha = 1f)
    {
        using var ones = Ones(dy.Device, dy.Dim(0));
        dy.Device.Ops.MatMul(ones, dy, grad.Reshape(1, dy.Dim(1)), transposeA: true, alpha: alpha, beta: 1f);
    }

    private static Tensor Ones(Device device, int rows)
    {
        var ones = device.Empty("ones", rows, 1);
        device.Ops.Fill(ones, 1f);
        return ones;
    }
}
