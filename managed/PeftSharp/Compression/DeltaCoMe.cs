using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Compression;

/// <summary>
/// Delta-CoMe (Ping et al., 2024): each linear weight's change Delta = W_fine - W_base as its top-r singular triplets,
/// the singular vectors stored at bit widths that fall with the singular value (mixed precision: the leading ones
/// at 8 bits, the next at 4, the rest at 2 here), each vector quantized symmetrically to its own max |entry|. Served
/// as low-rank factors: the result is a PEFT LoRA adapter (B = U_q S, A = V_q^T, scale 1) that merges, or serves per
/// row in the mixed batch, like any; unchanged linear weights get none; other changed tensors (norms; embeddings when untied) travel as its
/// modules_to_save. A change to tied embeddings cannot be carried that way and is refused.
/// </summary>
public static class DeltaCoMe
{
    /// <summary>The bit width of singular vector <paramref name="i"/> of <paramref name="rank"/>: 8 for the first eighth (at least one), 4 up to the half, 2 after.</summary>
    public static int BitsOf(int i, int rank) => i < Math.Max(1, rank / 8) ? 8 : i < Math.Max(1, rank / 2) ? 4 : 2;

    /// <summary>Rounds x to 2^(bits-1) - 1 levels each side of zero, scaled to its max |entry| (a zero vector stays zero).</summary>
    public static double[] Quantize(IReadOnlyList<double> x, int bits)
    {
        double max = x.Max(v => Math.Abs(v)), levels = (1 << (bits - 1)) - 1;
        return max == 0 ? new double[x.Count] : x.Select(v => Math.Round(v / max * levels) / levels * max).ToArray();
    }

    /// <summary>The compressed fine-tune, and the bytes its mixed-precision payload holds (vectors at their widths, two fp32 scales and sigma each).</summary>
    public static (PeftLoraAdapter Adapter, long PayloadBytes) Compress(LlamaModel baseModel, LlamaModel fine, int rank)
    {
        if (rank < 1) throw new ArgumentException($"Delta-CoMe rank {rank}: must be at least 1");
        LlamaConfig.RequireSameGraph(baseModel.Config, fine.Config);
        var c = baseModel.Config;
        var modules = new Dictionary<string, (float[], float[])>();
        long bytes = 0;
        foreach (var module in LoraAdapterConfig.LlamaLinearModules(c))
        {
            string name = module + ".weight";
            var w = baseModel[name].Value;
            int m = w.Dim(0), n = w.Dim(1), r = Math.Min(rank, Math.Min(m, n));
            var b = w.ToArray();
            var delta = fine[name].Value.ToArray().Select((v, i) => v - b[i]).ToArray();
            if (delta.All(v => v == 0f)) continue; // unchanged: no factors
            var (u, s, vt) = Svd.Top(delta, m, n, r, seed: 5, iterations: 30);
            var bf = new float[m * r];
            var af = new float[r * n];
            for (int j = 0; j < r; j++)
            {
                int bits = BitsOf(j, r);
                var uq = Quantize(Enumerable.Range(0, m).Select(i => u[i, j]).ToList(), bits);
                var vq = Quantize(Enumerable.Range(0, n).Select(i => vt[i, j]).ToList(), bits);
                for (int i = 0; i < m; i++) bf[i * r + j] = (float)(uq[i] * s[j]);
                for (int i = 0; i < n; i++) af[j * n + i] = (float)vq[i];
                bytes += ((long)(m + n) * bits + 7) / 8 + 12;
            }

            modules[module] = (af, bf);
        }

        if (modules.Count == 0) throw new ArgumentException("Delta-CoMe: no linear weight of the fine-tune differs from the base's; there is no change to factor");
        // Every other tensor that changed is carried whole (modules_to_save).
        var linear = modules.Keys.Select(m => m + ".weight").ToHashSet();
        var saved = new Dictionary<string, float[]>();
        foreach (var p in baseModel.Parameters.Where(p => !linear.Contains(p.Name)))
        {
            var f = fine[p.Name].Value.ToArray();
            if (f.AsSpan().SequenceEqual(p.Value.ToArray())) continue;
            if (c.TieWordEmbeddings && p.Name == "model.embed_tokens.weight")
            {
                throw new NotSupportedException("Delta-CoMe: the fine-tune changed the tied embedding, which a PEFT adapter's modules_to_save cannot carry (PEFT unties it); " +
                    "use peft compress --method bitdelta or compeft, which keep it");
            }

            saved[p.Name] = f;
            bytes += f.Length * 2L; // fp16 in a packed file
        }

        // A module narrower than the rank keeps all its singular triplets: its own r, and alpha = r so its scale stays 1.
        var narrow = modules.Select(kv => (Key: System.Text.RegularExpressions.Regex.Escape(kv.Key), R: kv.Value.Item2.Length / PeftLoraAdapter.LinearShape(c, kv.Key).Out))
            .Where(x => x.R != rank).ToList();
        var config = new LoraAdapterConfig
        {
            R = rank, LoraAlpha = rank, TargetModules = modules.Keys.ToList(),
            ModulesToSave = saved.Keys.Select(k => k[..^".weight".Length]).ToList(),
            RankPattern = narrow.ToDictionary(x => x.Key, x => x.R),
            AlphaPattern = narrow.ToDictionary(x => x.Key, x => (float)x.R),
        };
        return (new PeftLoraAdapter(config, modules, null, saved), bytes);
    }
}
