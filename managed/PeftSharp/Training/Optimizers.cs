using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// Base of the optimizers: steps every trainable parameter with its accumulated gradient. State tensors live on
/// the parameters' device and are created on the first step.
/// </summary>
public abstract class Optimizer : IDisposable
{
    protected Optimizer(IEnumerable<Parameter> parameters)
    {
        Parameters = parameters.ToList();
    }

    public IReadOnlyList<Parameter> Parameters { get; }

    /// <summary>Steps taken so far.</summary>
    public int StepCount { get; protected set; }

    /// <summary>Multiplies the learning rate per parameter (layer-wise decay); 1 for all by default.</summary>
    public Func<string, float> LearningRateScale { get; init; } = _ => 1f;

    /// <summary>Applies one update at <paramref name="learningRate"/> to every trainable parameter.</summary>
    public abstract void Step(float learningRate);

    /// <summary>The optimizer's state tensors by name (for checkpoints), downloaded to the host.</summary>
    public abstract IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState();

    /// <summary>Restores state written by <see cref="ExportState"/> and the step count.</summary>
    public abstract void ImportState(Func<string, float[]?> read, int stepCount);

    /// <summary>Forgets the state of <paramref name="reset"/> (fresh moments), as a restarted adapter needs.</summary>
    public abstract void ResetState(IEnumerable<Parameter> reset);

    public virtual void Dispose()
    {
    }

    /// <summary>A parameter's two Adam moments as checkpoints name them (exp_avg, exp_avg_sq, PyTorch's names).</summary>
    protected static IEnumerable<(string Name, float[] Values, int[] Shape)> Moments(string parameter, PeftSharp.Engine.Tensor m, PeftSharp.Engine.Tensor v)
    {
        yield return (parameter + ".exp_avg", m.ToArray(), m.Shape.ToArray());
        yield return (parameter + ".exp_avg_sq", v.ToArray(), v.Shape.ToArray());
    }

    /// <summary>The two moments <see cref="Moments"/> wrote for <paramref name="parameter"/>, or nulls.</summary>
    protected static (float[]? M, float[]? V) ReadMoments(Func<string, float[]?> read, string parameter) => (read(parameter + ".exp_avg"), read(parameter + ".exp_avg_sq"));
}
