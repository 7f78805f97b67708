using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// LoRA-GA initialisation: A and B from the SVD of the full weight gradient G (averaged over a few batches), so that
/// the first step of the low-rank product moves along the full gradient: with G = U S V^T, B0 = zeta U[:, 0:r] and
/// A0 = zeta V[:, r:2r]^T, the first update of s B A is proportional to G V2 V2^T + U1 U1^T G, the part of G in the
/// top singular subspaces (zeta = out^(1/4) / sqrt(gamma), LoRA-GA's stable scale). The base weight absorbs
/// -s B0 A0 so the model is unchanged at step 0; exporting then yields a rank-2r PEFT adapter that applies to the
/// original base (A' = [A; A0], B' = [B, -B0]), as PEFT does for its SVD-based initialisations.
/// </summary>
public static class LoraGa
{
    public static void AddLora(LlamaModel model, LoraAdapterConfig config, IReadOnlyList<(int[] Ids, int[] Targets)> batches, int batchSize, int seed, float gamma = 16f)
    {
        if (batches.Count == 0) throw new ArgumentException("LoRA-GA needs at least one batch to estimate the gradient");
        if (config.UseDora) throw new NotSupportedException("LoRA-GA with DoRA is not supported");
        var modules = config.TargetsIn(model.Config).ToList();
        var targetWeights = modules.Select(m => m + ".weight").ToHashSet();
        var was = model.Parameters.ToDictionary(p => p, p => p.Trainable);
        foreach (var p in model.Parameters) p.Trainable = targetWeights.Contains(p.Name);
        model.ZeroGrad();
        foreach (var (ids, targets) in batches) model.Loss(ids, targets, batchSize, backward: true);
        var grads = modules.ToDictionary(m => m, m => model[m + ".weight"].Grad.ToArray());
        foreach (var (p, t) in was)
        {
            p.Trainable = t;
            if (!t) p.ReleaseGrad(); // the base weights' gradients served the initialisation only
        }

        model.ZeroGrad();

        var init = new Dictionary<string, (float[] A, float[] B)>();
        foreach (var module in modules)
        {
            var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
            int r = config.For(module).Rank;
            var g = grads[module];
            for (int i = 0; i < g.Length; i++) g[i] /= batches.Count;
            var (u, _, v) = Svd.Top(g, outF, inF, 2 * r, seed);
            int k = u.GetLength(1);
            double zeta = Math.Pow(outF, 0.25) / Math.Sqrt(gamma);
            var a = new float[r * inF];
            var b = new float[outF * r];
            var rng = new Random(seed + module.Length);
            for (int j = 0; j < r; j++)
            {
                // A's rows take the next r right singular vectors; past the matrix's rank, a random unit row.
                for (int c = 0; c < inF; c++) a[j * inF + c] = (float)(zeta * (r + j < k ? v[c, r + j] : (rng.NextDouble() * 2 - 1) / Math.Sqrt(inF / 3.0)));
                for (int o = 0; o < outF; o++) b[o * r + j] = (float)(zeta * (j < k ? u[o, j] : 0));
            }

            init[module] = (a, b);
        }

        model.AddLora(config, seed, freezeBase: true, from: new PeftLoraAdapter(config, init));
        foreach (var (module, (a, b)) in init) model.AbsorbLoraInit(module, a, b);
    }
}
