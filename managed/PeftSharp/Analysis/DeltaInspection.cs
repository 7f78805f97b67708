using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Analysis;

/// <summary>What <see cref="DeltaInspection"/> measured of one linear weight (out, in).</summary>
/// <param name="DeltaSpectrum">The largest singular values of the fine-tune's change, largest first.</param>
/// <param name="DeltaEffectiveRank">exp(entropy) of the change's normalised singular values (Roy and Vetterli).</param>
/// <param name="BaseCondition">sigma_max / sigma_min of the base weight (KappaTune's proxy; infinity when singular).</param>
/// <param name="IntruderSimilarities">For each of the fine-tuned weight's top left singular vectors, its largest |cosine| with any of the base's.</param>
public sealed record TensorInspection(string Name, int Rows, int Cols, double[] DeltaSpectrum, double DeltaEffectiveRank, double BaseCondition, double FineCondition,
    double[] IntruderSimilarities, int Intruders);

/// <summary>
/// Measurements of a fine-tune against its base, per linear weight: the spectrum and effective rank of the change,
/// the condition numbers of both weights (KappaTune's proxy), and intruder dimensions (Shuttleworth et al., 2024:
/// top singular vectors of the fine-tuned weight that no singular vector of the base resembles, |cosine| below a
/// threshold, as LoRA tends to introduce). Exact spectra in double by <see cref="Svd"/> with every singular triplet,
/// so matrices up to <see cref="MaxSide"/> on their shorter side.
/// </summary>
public static class DeltaInspection
{
    /// <summary>The shorter side beyond which the exact spectra are too slow on the host and the tensor is refused.</summary>
    public const int MaxSide = 1024;

    public static IReadOnlyList<TensorInspection> Inspect(LlamaModel baseModel, LlamaModel fine, int top = 16, int intruderTop = 10, double threshold = 0.5)
    {
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        var result = new List<TensorInspection>();
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(baseModel.Config))
        {
            string name = module + ".weight";
            var w = baseModel[name].Value;
            int m = w.Dim(0), n = w.Dim(1);
            if (Math.Min(m, n) > MaxSide) throw new NotSupportedException($"inspect: {name} is {m} x {n}; exact spectra are computed up to {MaxSide} on the shorter side");
            var b = w.ToArray();
            var f = fine[name].Value.ToArray();
            var delta = f.Select((v, i) => v - b[i]).ToArray();
            var (_, ds, _) = Svd.Top(delta, m, n, Math.Min(m, n), seed: 3, iterations: 2);
            var (ub, sb, _) = Svd.Top(b, m, n, Math.Min(m, n), seed: 3, iterations: 2);
            var (uf, sf, _) = Svd.Top(f, m, n, Math.Min(m, n), seed: 3, iterations: 2);
            var similarity = Similarities(ub, uf, m, Math.Min(intruderTop, sf.Length));
            result.Add(new TensorInspection(name, m, n, ds.Take(top).ToArray(), EffectiveRank(ds), Condition(sb), Condition(sf), similarity,
                similarity.Count(s => s < threshold)));
        }

        return result;
    }

    /// <summary>exp of the entropy of p_i = s_i / sum s (1 for a rank-one change, the count for a flat spectrum, 0 for none).</summary>
    public static double EffectiveRank(IReadOnlyList<double> s)
    {
        double total = s.Sum();
        if (total <= 0) return 0;
        double h = -s.Where(v => v > 0).Sum(v => v / total * Math.Log(v / total));
        return Math.Exp(h);
    }

    /// <summary>sigma_max / sigma_min (infinity when the smallest is zero).</summary>
    public static double Condition(IReadOnlyList<double> s) => s.Count == 0 ? double.NaN : s[^1] <= 0 ? double.PositiveInfinity : s[0] / s[^1];

    /// <summary>For each of the first <paramref name="count"/> columns of <paramref name="fine"/> (m rows), the largest |dot| with any column of <paramref name="base"/>.</summary>
    public static double[] Similarities(double[,] @base, double[,] fine, int m, int count)
    {
        var result = new double[count];
        for (int j = 0; j < count; j++)
        {
            double best = 0;
            for (int i = 0; i < @base.GetLength(1); i++)
            {
                double dot = 0;
                for (int r = 0; r < m; r++) dot += @base[r, i] * fine[r, j];
                best = Math.Max(best, Math.Abs(dot));
            }

            result[j] = best;
        }

        return result;
    }

    /// <summary>The change's spectra, sigma_i / sigma_1 against i, averaged over the layers per module kind: one line each.</summary>
    public static string SpectraSvg(IReadOnlyList<TensorInspection> tensors, string title)
    {
        int k = tensors.Max(t => t.DeltaSpectrum.Length);
        var series = tensors.GroupBy(t => t.Name.Split('.')[^2]).Select(g => (g.Key, (IReadOnlyList<(double, double)>)Enumerable.Range(0, k)
            .Select(i => ((double)i + 1, g.Average(t => t.DeltaSpectrum.Length > i && t.DeltaSpectrum[0] > 0 ? t.DeltaSpectrum[i] / t.DeltaSpectrum[0] : 0))).ToList())).ToList();
        return SvgChart.Lines(title, "singular value index i", "sigma_i / sigma_1 of the change", series, (0, 1));
    }
}
