using PeftSharp.Model;

namespace PeftSharp.Formats;

/// <summary>
/// PEFT's pissa and olora initialisations change the base when an adapter loads: the starting product s B0 A0 is
/// subtracted from each targeted weight (W_res = W - s B0 A0), then the trained A and B are added, so the model is
/// W - s B0 A0 + s B A. That is the plain LoRA [B, -B0] [A; A0] of twice the rank over the unchanged base, which is what
/// PEFT's own conversion (path_initial_model_for_weight_conversion) writes; folding it in here lets every path
/// (merge, serving, the mixed batch) treat the adapter as plain LoRA. B0 A0 depends on the base only through
/// sign-free products, so it is reproduced exactly whatever signs an SVD or QR routine picks:
/// <list type="bullet">
/// <item>pissa (torch.linalg.svd): s B0 A0 = V_r diag(S_r) Uh_r, W's principal rank-r part;</item>
/// <item>olora (torch.linalg.qr): B0 A0 = Q_r R_r = Q_r Q_r^T W, W projected onto its first r columns, times s.</item>
/// </list>
/// All in double, from the fp32 weights as PEFT computes them.
/// </summary>
public static class BaseChangeFolding
{
    /// <summary>How far the top-r singular subspace may still move between iterations once converged (pissa).</summary>
    public const double SubspaceTolerance = 1e-13;

    public static PeftLoraAdapter Fold(PeftLoraAdapter adapter, LlamaModel model, string source)
    {
        var c = adapter.Config;
        var modules = new Dictionary<string, (float[] A, float[] B)>();
        foreach (var (module, (a, b)) in adapter.Modules)
        {
            var (r, _) = c.For(module);
            var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
            var w = model[module + ".weight"].Value.ToArray();
            float s = c.Scale(module);
            var (b0, a0) = c.InitLoraWeights switch
            {
                "pissa" => Pissa(w, outF, inF, r, s, $"{source}: {module}"),
                "olora" => Olora(w, outF, inF, r, $"{source}: {module}"),
                var other => throw new NotSupportedException($"{source}: init_lora_weights '{other}' cannot be folded"),
            };

            // A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r).
            var a2 = new float[2 * r * inF];
            Array.Copy(a, a2, r * inF);
            for (int i = 0; i < r * inF; i++) a2[r * inF + i] = (float)a0[i];
            var b2 = new float[outF * 2 * r];
            for (int o = 0; o < outF; o++)
            {
                for (int j = 0; j < r; j++)
                {
                    b2[o * 2 * r + j] = b[o * r + j];
                    b2[o * 2 * r + r + j] = (float)-b0[o * r + j];
                }
            }

            modules[module] = (a2, b2);
        }

        // Twice the rank at the same scale: alpha / r keeps its ratio when both double; alpha / sqrt(r) needs sqrt(2).
        float grow = c.UseRsLora ? MathF.Sqrt(2) : 2;
        var folded = c with
        {
            R = 2 * c.R, LoraAlpha = c.LoraAlpha * grow, InitLoraWeights = null,
            RankPattern = c.RankPattern.ToDictionary(p => p.Key, p => 2 * p.Value),
            AlphaPattern = c.AlphaPattern.ToDictionary(p => p.Key, p => p.Value * grow),
        };
        // A module whose alpha came from lora_alpha but rank from rank_pattern (or the reverse) keeps its scale too,
        // since both factors doubled; check it rather than trust it.
        foreach (var module in modules.Keys)
        {
            if (Math.Abs(folded.Scale(module) - c.Scale(module)) > 1e-6f * Math.Abs(c.Scale(module)))
            {
                throw new InvalidOperationException($"{source}: folding {module} changed its scale {c.Scale(module)} to {folded.Scale(module)}");
            }
        }

        return new PeftLoraAdapter(folded, modules, null, adapter.Saved, adapter.Biases); // lora_B's bias does not depend on the base
    }

    /// <summary>B0 (out, r) and A0 (r, in) as PEFT's pissa_init sets them: S_r /= s, A0 = sqrt(S_r) Uh_r, B0 = V_r sqrt(S_r).</summary>
    public static (double[] B0, double[] A0) Pissa(float[] w, int outF, int inF, int r, float scale, string what)
    {
        var (u, sv, v) = TopSingular(w, outF, inF, r, what);
        var b0 = new double[outF * r];
        var a0 = new double[r * inF];
        for (int j = 0; j < r; j++)
        {
            double root = Math.Sqrt(sv[j] / scale);
            for (int o = 0; o < outF; o++) b0[o * r + j] = u[o, j] * root;
            for (int i = 0; i < inF; i++) a0[j * inF + i] = v[i, j] * root;
        }

        return (b0, a0);
    }

    /// <summary>B0 = Q_r (out, r), A0 = R_r = Q_r^T W (r, in), as PEFT's olora_init takes them from torch.linalg.qr(W).</summary>
    public static (double[] B0, double[] A0) Olora(float[] w, int outF, int inF, int r, string what)
    {
        if (r > Math.Min(outF, inF)) throw new NotSupportedException($"{what}: olora rank {r} exceeds min(out, in) = {Math.Min(outF, inF)}");
        var q = new double[outF * r];
        for (int j = 0; j < r; j++)
        {
            // Column j of W, orthogonalised against the earlier ones twice (modified Gram-Schmidt with reorthogonalisation).
            var col = new double[outF];
            for (int o = 0; o < outF; o++) col[o] = w[o * inF + j];
            double original = Math.Sqrt(col.Sum(x => x * x));
            for (int pass = 0; pass < 2; pass++)
            {
                for (int p = 0; p < j; p++)
                {
                    double dot = 0;
                    for (int o = 0; o < outF; o++) dot += q[o * r + p] * col[o];
                    for (int o = 0; o < outF; o++) col[o] -= dot * q[o * r + p];
                }
            }

            double norm = Math.Sqrt(col.Sum(x => x * x));
            if (!(norm > 1e-10 * Math.Max(original, 1e-300)))
            {
                throw new NotSupportedException($"{what}: column {j} of the weight depends on the earlier ones, so its QR (olora) has no unique first {r} columns");
            }

            for (int o = 0; o < outF; o++) q[o * r + j] = col[o] / norm;
        }

        var a0 = new double[r * inF];
        for (int j = 0; j < r; j++)
        {
            for (int i = 0; i < inF; i++)
            {
                double acc = 0;
                for (int o = 0; o < outF; o++) acc += q[o * r + j] * w[o * inF + i];
                a0[j * inF + i] = acc;
            }
        }

        return (q, a0);
    }

    /// <summary>
    /// The top-r singular triplets of W (out, in) in double: block subspace iteration with oversampling (the whole
    /// space when it is small, which is then an exact SVD) until the subspace stops moving. A principal part that is
    /// not unique (equal singular values at r and r + 1) or that does not converge is refused, never approximated.
    /// </summary>
    public static (double[,] U, double[] S, double[,] V) TopSingular(float[] w, int outF, int inF, int r, string what)
    {
        int d = Math.Min(outF, inF);
        if (r > d) throw new NotSupportedException($"{what}: pissa rank {r} exceeds min(out, in) = {d}");
        int k = Math.Min(d, Math.Max(2 * r, r + 16));
        double[,]? previous = null;
        for (int iterations = 8; iterations <= 4096; iterations *= 2)
        {
            var (u, s, v) = PeftSharp.Training.Svd.Top(w, outF, inF, k, seed: 17, iterations: iterations);
            if (r < d && s[r - 1] - s[r] <= 1e-12 * s[0]) throw new NotSupportedException($"{what}: singular values {r} and {r + 1} are equal, so PiSSA's rank-{r} part is not unique");
            if (k == d) return (u, s, v); // the whole space: an exact SVD
            // Converged when each of the top r left singular vectors stopped turning: |cos| within 1e-12 of 1 (an angle near 1e-6).
            if (previous != null && Enumerable.Range(0, r).All(j =>
            {
                double dot = 0;
                for (int o = 0; o < outF; o++) dot += previous[o, j] * u[o, j];
                return 1 - Math.Abs(dot) <= SubspaceTolerance * 10;
            }))
            {
                return (u, s, v);
            }

            previous = u;
        }

        throw new NotSupportedException($"{what}: the top-{r} singular subspace did not converge; PiSSA cannot be reproduced exactly");
    }
}
