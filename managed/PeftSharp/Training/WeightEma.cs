using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>Exponential moving average of the trainable weights: shadow = decay * shadow + (1 - decay) * weight.</summary>
public sealed class WeightEma : IDisposable, ICheckpointState
{
    private readonly List<(Parameter Param, Tensor Shadow)> shadows;

    public WeightEma(LlamaModel model, float decay)
    {
        if (decay is < 0 or >= 1) throw new ArgumentException($"EMA decay {decay} must be in [0, 1)");
        Decay = decay;
        shadows = model.AllParameters.Where(p => p.Trainable).Select(p =>
        {
            var s = model.Device.Zeros(p.Name + ".ema", p.Value.Shape.ToArray());
            model.Device.Ops.Copy(p.Value, s);
            return (p, s);
        }).ToList();
    }

    public float Decay { get; }

    public void Update()
    {
        foreach (var (p, s) in shadows)
        {
            var ops = p.Value.Device.Ops;
            ops.Scale(s, Decay, s);
            ops.Axpy(1f - Decay, p.Value, s);
        }
    }

    /// <summary>Copies the averaged weights into the model (for evaluation or saving).</summary>
    public void CopyToModel()
    {
        foreach (var (p, s) in shadows) p.Value.Device.Ops.Copy(s, p.Value);
    }

    public string File => "ema.safetensors";

    public IEnumerable<PeftSharp.Formats.SafeTensorData> Export() =>
        shadows.Select(x => new PeftSharp.Formats.SafeTensorData(x.Param.Name, x.Shadow.ToArray(), x.Shadow.Shape.ToArray()));

    public void Import(PeftSharp.Formats.SafeTensorsFile file)
    {
        var problems = shadows.Where(x => !file.Contains(x.Param.Name) || file[x.Param.Name].Elements != x.Shadow.Length).Select(x => x.Param.Name).ToList();
        if (problems.Count > 0 || file.Tensors.Count != shadows.Count)
        {
            throw new PeftSharpInputException($"{file.Path}: the EMA in the checkpoint does not match this run's ({file.Tensors.Count} tensors there, {shadows.Count} here; missing or " +
                $"resized: {string.Join(", ", problems)})");
        }

        foreach (var (p, s) in shadows) s.CopyFrom(file.ReadFloats(p.Name));
    }

    public void Dispose()
    {
        foreach (var (_, s) in shadows) s.Dispose();
    }
}
