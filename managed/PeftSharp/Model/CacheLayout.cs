using PeftSharp.Adapters;
using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// Sequences that continue KV caches (prefill and decode): sequence j's new rows append to caches[j] and attend to
/// it causally (bottom-right aligned), to the chain of shared prefixes above it, and to prefix tuning's virtual
/// tokens. Runs of consecutive sequences that read the same shared prefix attend to it as one matrix (Hydragen),
/// merged with their own part exactly by log-sum-exp. Rows are the sequences' new tokens, stacked in order.
/// </summary>
internal sealed class CacheLayout : AttentionLayout
{
    private readonly IReadOnlyList<KvCache> caches;
    private readonly IReadOnlyList<int[]> newTokens;
    private readonly int[] rowStart;
    private readonly List<(KvCache Prefix, int Row0, int Rows)> prefixRuns = new();
    private readonly VirtualPrefix? prefix;
    private readonly int window;

    /// <param name="prefixes">The older form of naming a sequence's shared prefix (its cache's parent is the newer).</param>
    public CacheLayout(LlamaConfig c, IReadOnlyList<KvCache> caches, IReadOnlyList<int[]> newTokens, IReadOnlyList<KvCache?>? prefixes, VirtualPrefix? prefix)
    {
        if (caches.Count != newTokens.Count || caches.Count == 0)
        {
            throw new ArgumentException($"DecodeBatch needs one token list per cache ({caches.Count} caches, {newTokens.Count} token lists)");
        }

        if (prefixes != null && prefixes.Count != caches.Count) throw new ArgumentException($"DecodeBatch: {prefixes.Count} prefix entries for {caches.Count} sequences");
        this.caches = caches;
        this.newTokens = newTokens;
        this.prefix = prefix;
        window = c.AttentionWindow; // a sequence's own cache holds every position from its first, so the kernels' window is exact over it
        // Each sequence reads the chain of shared prefixes above its own cache: its cache's parents, or (older form)
        // the prefix given for it and that prefix's parents.
        var chains = Enumerable.Range(0, caches.Count).Select(j =>
        {
            var given = prefixes?[j];
            if (given != null && caches[j].Parent != null && !ReferenceEquals(given,
                caches[j].Parent)) throw new ArgumentException($"DecodeBatch: sequence {j}'s cache already continues another prefix");
            var top = caches[j].Parent ?? given;
            return top == null ? new List<KvCache>() : top.Chain.Append(top).ToList();
        }).ToArray();
        if (chains.Any(ch => ch.Any(caches.Contains))) throw new ArgumentException("DecodeBatch: a shared prefix cannot also be a sequence's own cache");
        int virtualTokens = prefix?.Tokens ?? 0;
        int PrefixLength(int j) => virtualTokens + chains[j].Sum(pf => pf.Length);

        if (caches.Distinct().Count() != caches.Count) throw new ArgumentException("DecodeBatch: a KV cache appears twice in one step");
        int seqs = caches.Count;
        rowStart = new int[seqs + 1];
        for (int j = 0; j < seqs; j++)
        {
            int tn = newTokens[j].Length;
            if (tn == 0) throw new ArgumentException($"DecodeBatch: sequence {j} has no new token");
            if (caches[j].Length + tn > caches[j].Capacity)
            {
                throw new ArgumentException($"KV cache {j} holds {caches[j].Capacity} positions; {caches[j].Length} used + {tn} new do not fit");
            }

            if (PrefixLength(j) > 0) CheckWindowCoversLevels(c.AttentionWindow, PrefixLength(j) + caches[j].Length + tn, $"sequence {j}'s shared prefix or virtual tokens");
            if (PrefixLength(j) + caches[j].Length + tn > c.ContextLimit)
            {
                throw new ArgumentException($"sequence {j}: shared prefix {PrefixLength(j)} + {caches[j].Length} cached + {tn} new positions exceed " +
                    c.ContextLimitText);
            }

            rowStart[j + 1] = rowStart[j] + tn;
        }

        Positions = Enumerable.Range(0, seqs).SelectMany(j => Enumerable.Range(PrefixLength(j) + caches[j].Length, newTokens[j].Length)).ToArray();
        // Runs of consecutive sequences reading the same shared prefix (at any depth of their chains): their query rows
        // attend to it as one matrix.
        foreach (var pf in chains.SelectMany(ch => ch).Distinct())
        {
            for (int j = 0; j < seqs;)
            {
                if (!chains[j].Contains(pf))
                {
                    j++;
                    continue;
                }

                int e = j;
                while (e < seqs && chains[e].Contains(pf)) e++;
                if (pf.Length > 0) prefixRuns.Add((pf, rowStart[j], rowStart[e] - rowStart[j]));
                j = e;
            }
        }
    }

    public override int Rows => rowStart[^1];

    public override int[] Positions { get; }

    /// <summary>Sequences (B).</summary>
    public int Sequences => caches.Count;

    /// <summary>The row of each sequence's last new token (B).</summary>
    public int[] LastRows => Enumerable.Range(0, caches.Count).Select(j => rowStart[j + 1] - 1).ToArray();

    /// <summary>Appends each sequence's new keys and values to its cache, then attends (see the class summary).</summary>
    public override void Forward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse)
    {
        int h = q.Dim(2), hkv = k.Dim(2), d = q.Dim(3), n = Rows;
        for (int j = 0; j < caches.Count; j++)
        {
            var cache = caches[j];
            int r0 = rowStart[j], tn = rowStart[j + 1] - r0, start = cache.Length, total = start + tn;
            ops.Copy(k.View(r0 * hkv * d, 1, tn, hkv, d), cache.Keys[layer].View(start * hkv * d, 1, tn, hkv, d));
            ops.Copy(v.View(r0 * hkv * d, 1, tn, hkv, d), cache.Values[layer].View(start * hkv * d, 1, tn, hkv, d));
            ops.Attention(q.View(r0 * h * d, 1, tn, h, d), cache.Keys[layer].View(0, 1, total, hkv, d), cache.Values[layer].View(0, 1, total, hkv, d),
                o.View(r0 * h * d, 1, tn, h, d), lse.View(r0 * h, 1, tn, h), causal: true, window: window);
        }

        var device = q.Device;
        // Prefix tuning: every row reads the layer's virtual tokens, one pass for the whole batch.
        if (prefix != null)
        {
            using var vo = device.Zeros("virtual_attn", 1, n, h, d);
            using var vl = device.Zeros("virtual_lse", 1, n, h);
            var level = prefix.Level(layer, 1);
            ops.Attention(q, level.Keys, level.Values, vo, vl, causal: false);
            ops.AttentionMerge(o, lse, vo, vl, o, lse);
        }

        // Hydragen: every run's queries against its shared prefix in one pass, merged exactly by log-sum-exp.
        foreach (var (pf, r0, rows) in prefixRuns)
        {
            using var po = device.Zeros("prefix_attn", 1, rows, h, d);
            using var pl = device.Zeros("prefix_lse", 1, rows, h);
            ops.Attention(q.View(r0 * h * d, 1, rows, h, d), pf.Keys[layer].View(0, 1, pf.Length, hkv, d), pf.Values[layer].View(0, 1, pf.Length, hkv, d), po, pl, causal: false);
            var rowsO = o.View(r0 * h * d, 1, rows, h, d);
            var rowsL = lse.View(r0 * h, 1, rows, h);
            ops.AttentionMerge(rowsO, rowsL, po, pl, rowsO, rowsL);
        }
    }

    public override void Backward(Ops ops, int layer, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv) =>
        throw new NotSupportedException("decoding into KV caches has no backward pass: train through Loss or GroupedLoss");

    /// <summary>After every layer ran: the caches count their new positions.</summary>
    public void Commit()
    {
        for (int j = 0; j < caches.Count; j++) caches[j].Length += newTokens[j].Length;
    }
}
