using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// IA3 on one linear module, as PEFT's IA3 Linear computes it: a learned vector l rescales the output, y = (x W^T) * l
/// with l (out), or for a feed-forward module (Llama's down_proj) the input, y = (x * l) W^T with l (in). PEFT
/// initialises l to ones (the model unchanged). <see cref="MergeInto"/> scales W's rows (output) or columns (input).
/// </summary>
public sealed class Ia3Layer : IAdapterLayer
{
    internal Ia3Layer(string module, Parameter vector, bool feedForward)
    {
        Module = module;
        Vector = vector;
        FeedForward = feedForward;
    }

    /// <summary>The module it adapts (model.layers.0.self_attn.k_proj).</summary>
    public string Module { get; }

    /// <summary>l: (out) scaling the output, or (in) scaling the input of a feed-forward module.</summary>
    public Parameter Vector { get; }

    /// <summary>PEFT's feedforward_modules: the vector scales the module's input instead of its output.</summary>
    public bool FeedForward { get; }

    public IEnumerable<Parameter> Parameters => new[] { Vector };

    /// <summary>IA3 forms the product itself (a feed-forward module's input is scaled before it).</summary>
    public bool ComputesProduct => true;

    private Ops Ops => Vector.Value.Device.Ops;

    public IDisposable? Forward(Parameter weight, Tensor x, Tensor y, bool training, int dropoutSeed)
    {
        var device = Vector.Value.Device;
        if (FeedForward)
        {
            using var scaled = device.Zeros(Module + ".ia3_x", x.Shape.ToArray());
            Ops.ScaleColumns(x, Vector.Value, scaled);
            Ops.Linear(scaled, weight.Value, y);
            return training ? new NoState() : null; // the backward needs x alone
        }

        Ops.Linear(x, weight.Value, y);
        return OutputScale.Forward(y, Vector, training, Module + ".ia3_wx");
    }

    /// <summary>
    /// Output form: dl = sum over rows of (x W^T) * dy, dx = (dy * l) W. Input form: dx' = dy W, dl = sum over rows of
    /// x * dx', dx = dx' * l. dW (into the weight's Grad) when the weight trains.
    /// </summary>
    public void Backward(Parameter weight, Tensor x, Tensor dy, Tensor dx, IDisposable saved)
    {
        var device = Vector.Value.Device;
        var ops = Ops;
        if (FeedForward)
        {
            using var dScaled = device.Zeros(Module + ".ia3_dx", x.Shape.ToArray());
            using var scaled = device.Zeros(Module + ".ia3_x", x.Shape.ToArray());
            ops.ScaleColumns(x, Vector.Value, scaled);
            ops.LinearBackward(scaled, weight.Value, dy, dScaled, weight.Trainable ? weight.Grad : null, accumulateWeight: true);
            if (Vector.Trainable)
            {
                using var product = device.Zeros(Module + ".ia3_xdx", x.Shape.ToArray());
                ops.Mul(x, dScaled, product);
                RowBroadcast.AddColumnSums(product, Vector.Grad);
            }

            ops.ScaleColumns(dScaled, Vector.Value, dx);
            return;
        }

        OutputScale.Backward(weight, Vector, x, dy, dx, (Tensor)saved, Module + ".ia3");
    }

    /// <summary>What a feed-forward module's forward keeps: nothing (x is passed to the backward again).</summary>
    private sealed class NoState : IDisposable
    {
        public void Dispose()
        {
        }
    }

    /// <summary>W (out, in): rows times l (output form) or columns times l (input form).</summary>
    public void MergeInto(Tensor weight) => ScaleWeight(weight, Vector.Value.ToArray(), FeedForward);

    /// <summary>Scales W (out, in) by <paramref name="vector"/>: its columns for a feed-forward module, else its rows (through the host: a one-off).</summary>
    internal static void ScaleWeight(Tensor weight, float[] vector, bool feedForward)
    {
        var w = weight.ToArray();
        int cols = weight.Dim(1);
        for (int i = 0; i < w.Length; i++) w[i] *= feedForward ? vector[i % cols] : vector[i / cols];
        weight.CopyFrom(w);
    }
}
