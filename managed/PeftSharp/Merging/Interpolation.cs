using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Merging;

/// <summary>
/// WiSE-FT (Wortsman et al., 2022) and model-soup curves: held-out loss and exact match of theta(alpha) = (1 - alpha)
/// theta_base + alpha theta_fine at evenly spaced alpha from 0 (the base) to 1 (the fine-tune), each computed in
/// double and rounded once, on one scratch copy of the weights.
/// </summary>
public static class Interpolation
{
    public static IReadOnlyList<(double Alpha, EvalResult Result)> Curve(LlamaModel baseModel, LlamaModel fine, IReadOnlyList<Example> heldOut, int seqLen, int points = 11)
    {
        if (points < 2) throw new ArgumentException($"interpolation curve: {points} points; give at least 2 (alpha 0 and 1)");
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        using var scratch = LlamaModel.FromTensors(baseModel.Device, baseModel.Config, (name, _) => baseModel[name].Value.ToArray());
        if (baseModel.HasTokenizer) scratch.Tokenizer = baseModel.Tokenizer;
        var pairs = baseModel.Parameters.Select(p => (p.Name, Base: p.Value.ToArray(), Fine: fine[p.Name].Value.ToArray())).ToList();
        var curve = new List<(double, EvalResult)>();
        for (int i = 0; i < points; i++)
        {
            double alpha = (double)i / (points - 1);
            foreach (var (name, b, f) in pairs) scratch[name].Value.CopyFrom(b.Select((v, j) => (float)((1 - alpha) * v + alpha * f[j])).ToArray());
            curve.Add((alpha, Evaluator.Evaluate(scratch, heldOut, seqLen)));
        }

        return curve;
    }
}
