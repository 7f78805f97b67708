using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Adapters;

/// <summary>
/// A trainable layer that sits on one linear module's base weight W (out, in) and changes its output, as PEFT's
/// LoraVariant does for LoRA and DoRA: <see cref="Forward"/> adds its part to y = x W^T, <see cref="Backward"/> carries
/// dL/dy through W and itself, <see cref="MergeInto"/> folds it into W. Shapes: x (rows, in), y and dy (rows, out).
/// </summary>
public interface IAdapterLayer
{
    /// <summary>What an optimizer steps.</summary>
    IEnumerable<Parameter> Parameters { get; }

    /// <summary>
    /// y holds x W^T (and any row variants' deltas); adds the adapter's part. With <paramref name="training"/>,
    /// dropout is on (masks drawn from <paramref name="dropoutSeed"/>) and the result holds what
    /// <see cref="Backward"/> needs (the caller disposes it); otherwise it returns null.
    /// </summary>
    IDisposable? Forward(Parameter weight, Tensor x, Tensor y, bool training, int dropoutSeed);

    /// <summary>
    /// dx = dL/dx through the base product and the adapter (overwritten); adds dL/dW into the weight's Grad when it
    /// trains, and the adapter's gradients into its parameters'. <paramref name="saved"/> is what Forward returned.
    /// </summary>
    void Backward(Parameter weight, Tensor x, Tensor dy, Tensor dx, IDisposable saved);

    /// <summary>W becomes the weight that computes base plus adapter (W + s B A for LoRA).</summary>
    void MergeInto(Tensor weight);

    /// <summary>
    /// True when <see cref="Forward"/> forms the product itself (y is then overwritten, not added to): IA3 scales a
    /// feed-forward module's input before it.
    /// </summary>
    bool ComputesProduct => false;
}
