using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>A named trainable tensor (Hugging Face name) and its gradient, both on the model's device.</summary>
public sealed class Parameter : IDisposable
{
    private Tensor? grad;

    public Parameter(string name, Tensor value)
    {
        Name = name;
        Value = value;
    }

    public string Name { get; }

    public Tensor Value { get; }

    /// <summary>
    /// Accumulated gradient, allocated (as zeros) the first time anything asks for it: a frozen parameter that no
    /// backward pass touches holds no gradient, so serving and adapter training keep one copy of the base weights.
    /// <see cref="ZeroGrad"/> clears it.
    /// </summary>
    public Tensor Grad => grad ??= Value.Device.Zeros(Name + ".grad", Value.Shape.ToArray());

    /// <summary>Whether <see cref="Grad"/> has been allocated.</summary>
    public bool HasGrad => grad != null;

    /// <summary>Frozen parameters get no gradient work and no optimizer step.</summary>
    public bool Trainable { get; set; } = true;

    public void ZeroGrad()
    {
        if (grad != null) Value.Device.Ops.Fill(grad, 0f);
    }

    /// <summary>Frees the gradient (a parameter frozen for good); the next use of <see cref="Grad"/> allocates zeros again.</summary>
    public void ReleaseGrad()
    {
        grad?.Dispose();
        grad = null;
    }

    public void Dispose()
    {
        Value.Dispose();
        ReleaseGrad();
    }

    public override string ToString() => $"{Name} {string.Join("x", Value.Shape)}";
}
