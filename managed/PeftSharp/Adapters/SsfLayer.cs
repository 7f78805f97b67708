using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// SSF (Lian et al., 2022: scaling and shifting features) after one linear module: y = (x W^T) * gamma + beta, gamma
/// and beta (out), initialised to ones and zeros (the model unchanged). Mergeable: W's rows times gamma, and beta
/// into the module's bias where it has one.
/// </summary>
public sealed class SsfLayer : IAdapterLayer
{
    internal SsfLayer(string module, Parameter scale, Parameter shift)
    {
        Module = module;
        Scale = scale;
        Shift = shift;
    }

    public string Module { get; }

    /// <summary>gamma (out).</summary>
    public Parameter Scale { get; }

    /// <summary>beta (out).</summary>
    public Parameter Shift { get; }

    public IEnumerable<Parameter> Parameters => new[] { Scale, Shift };

    public IDisposable? Forward(Parameter weight, Tensor x, Tensor y, bool training, int dropoutSeed)
    {
        var product = OutputScale.Forward(y, Scale, training, Module + ".ssf_wx");
        RowBroadcast.AddToRows(y, Shift.Value);
        return product;
    }

    /// <summary>dgamma = sum over rows of (x W^T) * dy, dbeta = sum over rows of dy, dx = (dy * gamma) W (dW when the weight trains).</summary>
    public void Backward(Parameter weight, Tensor x, Tensor dy, Tensor dx, IDisposable saved)
    {
        if (Shift.Trainable) RowBroadcast.AddColumnSums(dy, Shift.Grad);
        OutputScale.Backward(weight, Scale, x, dy, dx, (Tensor)saved, Module + ".ssf");
    }

    /// <summary>W's rows times gamma; beta has no place in W (see <see cref="PeftSharp.Variants.SsfAdapter.MergeInto"/> for the bias).</summary>
    public void MergeInto(Tensor weight) => Ia3Layer.ScaleWeight(weight, Scale.Value.ToArray(), feedForward: false);
}
