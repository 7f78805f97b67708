using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>A named trainable tensor (Hugging Face name) and its gradient, both on the model's device.</summary>
public sealed class Parameter : IDisposable
{
    public Parameter(string name, Tensor value)
    {
        Name = name;
        Value = value;
        Grad = value.Device.Zeros(name + ".grad", value.Shape.ToArray());
    }

    public string Name { get; }

    public Tensor Value { get; }

    /// <summary>Accumulated gradient; <see cref="ZeroGrad"/> clears it.</summary>
    public Tensor Grad { get; }

    /// <summary>Frozen parameters get no gradient work and no optimizer step.</summary>
    public bool Trainable { get; set; } = true;

    public void ZeroGrad() => Value.Device.Ops.Fill(Grad, 0f);

    public void Dispose()
    {
        Value.Dispose();
        Grad.Dispose();
    }

    public override string ToString() => $"{Name} {string.Join("x", Value.Shape)}";
}
