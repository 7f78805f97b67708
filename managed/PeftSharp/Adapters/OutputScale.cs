using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>y = (x W^T) * c per output column: the forward and backward that IA3's output form and SSF's scale share.</summary>
internal static class OutputScale
{
    /// <summary>y (rows, out) holds x W^T; scales its columns by c. Training, returns x W^T (y before) for c's gradient.</summary>
    public static Tensor? Forward(Tensor y, Parameter c, bool training, string name)
    {
        var device = c.Value.Device;
        Tensor? product = null;
        if (training)
        {
            product = device.Zeros(name, y.Shape.ToArray());
            device.Ops.Copy(y, product);
        }

        device.Ops.ScaleColumns(y, c.Value, y);
        return product;
    }

    /// <summary>dc += sum over rows of (x W^T) * dy (when c trains), dx = (dy * c) W, dW into the weight's Grad when it trains.</summary>
    public static void Backward(Parameter weight, Parameter c, Tensor x, Tensor dy, Tensor dx, Tensor product, string name)
    {
        var device = c.Value.Device;
        var ops = device.Ops;
        if (c.Trainable)
        {
            using var both = device.Zeros(name + "_dy", dy.Shape.ToArray());
            ops.Mul(product, dy, both);
            RowBroadcast.AddColumnSums(both, c.Grad);
        }

        using var scaledDy = device.Zeros(name + "_scaled_dy", dy.Shape.ToArray());
        ops.ScaleColumns(dy, c.Value, scaledDy);
        ops.LinearBackward(x, weight.Value, scaledDy, dx, weight.Trainable ? weight.Grad : null, accumulateWeight: true);
    }
}
