using PeftSharp.Model;
using PeftSharp.Serving;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>Decoding prompts in one mixed batch of variants, and each prompt alone, for the serving tests' row-by-row checks.</summary>
internal static class MixedBatch
{
    /// <summary>Prefills <paramref name="prompts"/> in one batch, prompt j on variant <paramref name="variants"/>[j] of <paramref name="set"/> (-1: the base); each row's last logits.</summary>
    public static float[][] Decode(LlamaModel model, VariantSet set, int[][] prompts, int[] variants)
    {
        var caches = prompts.Select(p => new KvCache(model, p.Length + 1)).ToArray();
        try
        {
            using var bound = set.Bind(prompts.SelectMany((p, j) => Enumerable.Repeat(variants[j], p.Length)).ToArray());
            return model.DecodeBatch(caches, prompts, bound);
        }
        finally
        {
            foreach (var c in caches) c.Dispose();
        }
    }

    /// <summary>The last logits of <paramref name="prompt"/> prefilled alone on <paramref name="model"/>.</summary>
    public static float[] Alone(LlamaModel model, int[] prompt)
    {
        using var cache = new KvCache(model, prompt.Length + 1);
        return model.DecodeStep(cache, prompt);
    }
}
