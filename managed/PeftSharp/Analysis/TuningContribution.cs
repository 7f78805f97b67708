using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Variants;

namespace PeftSharp.Analysis;

/// <summary>One prompt's tuning contribution: TuCo, and each layer's last-token components.</summary>
/// <param name="TuCo">||sum FTC|| / (||sum PTC|| + ||sum FTC||) over the layers, at the last token: 0 when fine-tuning changes nothing.</param>
/// <param name="Ptc">Per layer, the pre-training component of the last token (Dm): the base layer's update to the fine-tuned stream.</param>
/// <param name="Ftc">Per layer, the fine-tuning component (Dm): the fine-tuned layer's update minus the base layer's.</param>
/// <param name="Embedding">The fine-tuned model's input embedding of the last token (x_0).</param>
public sealed record TuCoResult(string Prompt, double TuCo, float[][] Ptc, float[][] Ftc, float[] Embedding)
{
    /// <summary>||FTC_l|| / (||PTC_l|| + ||FTC_l||) of each layer alone.</summary>
    public double[] LayerShares => Ptc.Zip(Ftc, (p, f) => Share(Norm(p), Norm(f))).ToArray();

    internal static double Norm(IEnumerable<float> v) => Math.Sqrt(v.Sum(x => (double)x * x));

    internal static double Share(double ptc, double ftc) => ptc + ftc == 0 ? 0 : ftc / (ptc + ftc);
}

/// <summary>
/// TuCo (Nuti et al., 2025): the share of a fine-tuned model's forward pass that fine-tuning contributes. The
/// fine-tuned stream x_l enters layer l of both models; PTC_l = f_base(x_l, l), FTC_l = f_fine(x_l, l) - PTC_l, and
/// x_{l+1} = x_l + PTC_l + FTC_l (the fine-tuned forward, exactly). TuCo = ||sum_l FTC_l|| / (||sum_l PTC_l|| +
/// ||sum_l FTC_l||) at the prompt's last token, a whole decoder layer (attention and MLP) counting as one update.
/// Base and fine-tune run as the two rows of each prompt in one mixed batch over the shared weights (the fine-tune
/// a variant: LoRA, IA3, a 1-bit or sparse delta; a full fine-tune enters as its exact sparse delta), every row
/// pair's stream set to the fine-tuned one between layers.
/// </summary>
public static class TuningContribution
{
    /// <summary>TuCo of each prompt ([BOS] prompt) for variant <paramref name="variant"/> of <paramref name="set"/> against the base.</summary>
    public static IReadOnlyList<TuCoResult> Measure(VariantSet set, string variant, IReadOnlyList<string> prompts)
    {
        var model = set.Model;
        int fine = set.IndexOf(variant);
        if (fine < 0) throw new ArgumentException("TuCo: name a variant to measure against the base, not the base itself");
        if (set.PrefixOf(fine) != null) throw new NotSupportedException($"TuCo: variant '{variant}' is a prefix-tuning adapter, which adds no layer update to decompose");
        var tokens = prompts.Select(p =>
        {
            var t = model.Tokenizer.EncodeStart(p);
            return t.Count > 0 ? t.ToArray() : throw new ArgumentException($"TuCo: empty prompt, and tokenizer {model.Tokenizer.Name} adds no BOS");
        }).ToArray();
        var results = new List<TuCoResult>();
        const int chunk = 32;
        lock (model.GenerationLock)
        {
            for (int i = 0; i < prompts.Count; i += chunk)
            {
                var part = Enumerable.Range(i, Math.Min(chunk, prompts.Count - i)).ToList();
                results.AddRange(MeasureChunk(model, set, fine, part.Select(k => prompts[k]).ToList(), part.Select(k => tokens[k]).ToList()));
            }
        }

        return results;
    }

    /// <summary>TuCo of each prompt for a fine-tuned model against its base: the fine-tune enters as its exact sparse delta.</summary>
    public static IReadOnlyList<TuCoResult> Measure(LlamaModel baseModel, LlamaModel fine, IReadOnlyList<string> prompts)
    {
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        using var set = new VariantSet(baseModel);
        set.AddSparse("fine", SparseDelta.Between(baseModel, fine));
        return Measure(set, "fine", prompts);
    }

    private static IEnumerable<TuCoResult> MeasureChunk(LlamaModel model, VariantSet set, int fine, List<string> prompts, List<int[]> tokens)
    {
        var c = model.Config;
        int dm = c.HiddenSize, n = prompts.Count;
        // Sequences 2k (base rows) and 2k + 1 (fine-tune rows) read prompt k; rows stack in sequence order.
        var start = new int[2 * n];
        for (int s = 1; s < 2 * n; s++) start[s] = start[s - 1] + tokens[(s - 1) / 2].Length;
        var ptc = Enumerable.Range(0, n).Select(_ => new float[c.NumHiddenLayers][]).ToArray();
        var ftc = Enumerable.Range(0, n).Select(_ => new float[c.NumHiddenLayers][]).ToArray();
        var embedding = new float[n][];
        var ops = model.Device.Ops;
        var caches = Enumerable.Range(0, 2 * n).Select(s => new KvCache(model, tokens[s / 2].Length)).ToArray();
        try
        {
            using var bound = set.Bind(Enumerable.Range(0, 2 * n).SelectMany(s => Enumerable.Repeat(s % 2 == 0 ? -1 : fine, tokens[s / 2].Length)).ToArray());
            void Hook(int layer, Tensor before, Tensor after)
            {
                for (int k = 0; k < n; k++)
                {
                    int len = tokens[k].Length, b0 = start[2 * k], f0 = start[2 * k + 1], last = len - 1;
                    if (layer < 0)
                    {
                        // x_0 is the fine-tuned model's embedding for both rows (a fine-tune may change the embedding).
                        ops.Copy(after.View(f0 * dm, len, dm), after.View(b0 * dm, len, dm));
                        continue;
                    }

                    var xIn = Row(before, f0 + last, dm);
                    var yBase = Row(after, b0 + last, dm);
                    var yFine = Row(after, f0 + last, dm);
                    if (layer == 0) embedding[k] = xIn;
                    ptc[k][layer] = yBase.Select((v, i) => v - xIn[i]).ToArray();
                    ftc[k][layer] = yFine.Select((v, i) => v - yBase[i]).ToArray();
                    ops.Copy(after.View(f0 * dm, len, dm), after.View(b0 * dm, len, dm)); // both rows read x_{l+1} of the fine-tune
                }
            }

            model.DecodeBatchWithLayerHook(caches, Enumerable.Range(0, 2 * n).Select(s => tokens[s / 2]).ToArray(), bound, Hook);
        }
        finally
        {
            foreach (var cache in caches) cache.Dispose();
        }

        for (int k = 0; k < n; k++)
        {
            var sumP = new double[dm];
            var sumF = new double[dm];
            for (int l = 0; l < c.NumHiddenLayers; l++)
            {
                for (int i = 0; i < dm; i++)
                {
                    sumP[i] += ptc[k][l][i];
                    sumF[i] += ftc[k][l][i];
                }
            }

            double p = Math.Sqrt(sumP.Sum(v => v * v)), f = Math.Sqrt(sumF.Sum(v => v * v));
            yield return new TuCoResult(prompts[k], TuCoResult.Share(p, f), ptc[k], ftc[k], embedding[k]);
        }
    }

    private static float[] Row(Tensor t, int row, int dm) => t.View(row * dm, 1, dm).ToArray();
}
