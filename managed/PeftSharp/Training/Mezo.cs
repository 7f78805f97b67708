using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// MeZO (Malladi et al., 2023): zeroth-order SGD from two forward passes. Each step draws z ~ N(0, I) over the
/// parameters from a seed, moves them to theta + eps z and theta - eps z in place for the two losses, puts them back,
/// and steps theta -= lr g z with the projected gradient g = (L+ - L-) / (2 eps), z regenerated from the same seed
/// each time instead of stored: memory of inference (no gradients, no optimizer state). Parameter k's z is the
/// standard normal stream of <see cref="Noise"/>(step seed, k).
/// </summary>
public sealed class Mezo : Optimizer
{
    /// <param name="parameters">What MeZO moves; they should be frozen (so no gradient is allocated for them).</param>
    public Mezo(IEnumerable<Parameter> parameters, float epsilon, int seed)
        : base(parameters)
    {
        if (!(epsilon > 0f) || !float.IsFinite(epsilon)) throw new ArgumentException($"MeZO epsilon {epsilon}: must be positive and finite");
        Epsilon = epsilon;
        Seed = seed;
    }

    /// <summary>The perturbation scale eps.</summary>
    public float Epsilon { get; }

    public int Seed { get; }

    /// <summary>The last step's projected gradient g.</summary>
    public double LastProjectedGradient { get; private set; }

    public override void Step(float learningRate) =>
        throw new InvalidOperationException("MeZO steps from two losses: call Step(learningRate, loss)");

    /// <summary>
    /// One MeZO step with <paramref name="loss"/> evaluating the current parameters. Returns L+ and L-; the update is
    /// skipped (parameters back as they were) when g is not finite.
    /// </summary>
    public (double LossPlus, double LossMinus) Step(float learningRate, Func<double> loss)
    {
        int stepSeed = StepSeed(Seed, StepCount);
        Perturb(stepSeed, Epsilon);
        double plus = loss();
        Perturb(stepSeed, -2f * Epsilon);
        double minus = loss();
        Perturb(stepSeed, Epsilon);
        double g = (plus - minus) / (2.0 * Epsilon);
        LastProjectedGradient = g;
        if (double.IsFinite(g))
        {
            Perturb(stepSeed, (float)(-learningRate * g), useScale: true);
            StepCount++;
        }

        return (plus, minus);
    }

    /// <summary>The seed of step <paramref name="step"/>'s direction.</summary>
    public static int StepSeed(int seed, int step) => unchecked(seed * 1_000_003 + step * 7919 + 17);

    /// <summary>z for parameter <paramref name="k"/> (of <paramref name="length"/> entries) in the step seeded <paramref name="stepSeed"/>: standard normals.</summary>
    public static float[] Noise(int stepSeed, int k, int length)
    {
        var rng = new Random(unchecked(stepSeed * 31 + k));
        var z = new float[length];
        for (int i = 0; i < z.Length; i++) z[i] = (float)LlamaModel.Gaussian(rng);
        return z;
    }

    /// <summary>theta_k += scale z_k for every parameter (through the host, one parameter at a time).</summary>
    private void Perturb(int stepSeed, float scale, bool useScale = false)
    {
        for (int k = 0; k < Parameters.Count; k++)
        {
            var p = Parameters[k];
            float s = useScale ? scale * LearningRateScale(p.Name) : scale;
            var values = p.Value.ToArray();
            var z = Noise(stepSeed, k, values.Length);
            for (int i = 0; i < values.Length; i++) values[i] += s * z[i];
            p.Value.CopyFrom(values);
        }
    }

    /// <summary>None: MeZO keeps no state beyond its seed and step count.</summary>
    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState() => Array.Empty<(string, float[], int[])>();

    public override void ImportState(Func<string, float[]?> read, int stepCount) => StepCount = stepCount;

    public override void ResetState(IEnumerable<Parameter> reset)
    {
    }
}
