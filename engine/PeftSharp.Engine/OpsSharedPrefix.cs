namespace PeftSharp.Engine;

/// <summary>
/// One level of shared prefixes: the keys and values of G prefixes, and which prefix each sequence of the batch
/// reads at this level (-1: none). Sequences that share a prefix must be contiguous in the batch, so their queries
/// form one matrix. Keys, Values (G, P, Hkv, D); P may be 0.
/// </summary>
public sealed record PrefixLevel(Tensor Keys, Tensor Values, int[] GroupOfSequence);

public sealed partial class Ops
{
    /// <summary>
    /// Merges two partial attention results over disjoint key sets by their log-sum-exp (FlashInfer's merge_state):
    /// o1, o2, o (N..., D) and lse1, lse2, lse with one entry per row of D. o and lse may alias o1 and lse1. A side
    /// whose lse is -infinity contributes nothing, exactly.
    /// </summary>
    public void AttentionMerge(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2, Tensor o, Tensor lse)
    {
        Check("attention merge", o1, lse1, o2, lse2, o, lse);
        SameShape("attention merge", o1, o2, o);
        SameShape("attention merge", lse1, lse2, lse);
        int d = o1.Dim(-1);
        if (d == 0 || lse1.Length * d != o1.Length) throw new ArgumentException($"attention merge: lse {lse1} must hold one value per row of D = {d} of o {o1}");
        if (lse1.Length > 0) device.AttentionMergeCore(o1, lse1, o2, lse2, o, lse, lse1.Length, d);
    }

    /// <summary>
    /// Attention of every sequence over its shared prefixes and its own suffix, Hydragen-style: for each prefix, the
    /// queries of all the sequences that share it run as one matrix against its keys (so the prefix is read once,
    /// not once per sequence), the suffix runs per sequence (causal, bottom-right aligned), and the partial results
    /// merge exactly by log-sum-exp. Equals causal attention over [level 0 prefix, level 1 prefix, ..., suffix].
    /// q, o (B, S, H, D); suffix keys/values (B, Ts, Hkv, D) with Ts &gt;= S (a cache may hold earlier suffix
    /// tokens); lse (B, S, H).
    /// </summary>
    public void SharedPrefixAttention(Tensor q, IReadOnlyList<PrefixLevel> levels, Tensor suffixK, Tensor suffixV, Tensor o, Tensor lse, float? scale = null)
    {
        Attention(q, suffixK, suffixV, o, lse, causal: true, scale);
        int b = q.Dim(0), s = q.Dim(1), h = q.Dim(2), d = q.Dim(3);
        foreach (var (level, g, b0, n) in Runs("shared-prefix attention", q, levels))
        {
            int p = level.Keys.Dim(1), hkv = level.Keys.Dim(2);
            var qg = q.View(b0 * s * h * d, 1, n * s, h, d);
            using var og = device.Zeros("prefix_o", 1, n * s, h, d);
            using var lg = device.Zeros("prefix_lse", 1, n * s, h);
            Attention(qg, level.Keys.View(g * p * hkv * d, 1, p, hkv, d), level.Values.View(g * p * hkv * d, 1, p, hkv, d), og, lg, causal: false, scale);
            var rowsO = o.View(b0 * s * h * d, 1, n * s, h, d);
            var rowsL = lse.View(b0 * s * h, 1, n * s, h);
            AttentionMerge(rowsO, rowsL, og, lg, rowsO, rowsL);
        }
    }

    /// <summary>
    /// Backward of <see cref="SharedPrefixAttention"/> from its final o and lse: each part's gradient is the
    /// ordinary attention backward of that part with the final o and lse (the merged softmax's probabilities restricted
    /// to the part's keys). dq sums over the parts; each prefix's dK, dV sum over every sequence that shares it.
    /// dLevelKeys[l], dLevelValues[l] have the shapes of levels[l]'s keys and values; all outputs are overwritten.
    /// </summary>
    public void SharedPrefixAttentionBackward(
        Tensor q, IReadOnlyList<PrefixLevel> levels, Tensor suffixK, Tensor suffixV, Tensor o, Tensor lse, Tensor dO,
        Tensor dq, IReadOnlyList<Tensor> dLevelKeys, IReadOnlyList<Tensor> dLevelValues, Tensor dSuffixK, Tensor dSuffixV, float? scale = null)
    {
        if (dLevelKeys.Count != levels.Count || dLevelValues.Count != levels.Count)
        {
            throw new ArgumentException($"shared-prefix attention backward: {levels.Count} levels need as many dK and dV tensors ({dLevelKeys.Count}, {dLevelValues.Count} given)");
        }

        for (int l = 0; l < levels.Count; l++)
        {
            SameShape("shared-prefix attention backward", levels[l].Keys, dLevelKeys[l], dLevelValues[l]);
            Fill(dLevelKeys[l], 0f);
            Fill(dLevelValues[l], 0f);
        }

        AttentionBackward(q, suffixK, suffixV, o, lse, dO, dq, dSuffixK, dSuffixV, causal: true, scale);
        int s = q.Dim(1), h = q.Dim(2), d = q.Dim(3);
        foreach (var (level, g, b0, n) in Runs("shared-prefix attention backward", q, levels))
        {
            int li = IndexOf(levels, level);
            int p = level.Keys.Dim(1), hkv = level.Keys.Dim(2);
            if (p == 0) continue;
            using var dqg = device.Zeros("prefix_dq", 1, n * s, h, d);
            using var dkg = device.Zeros("prefix_dk", 1, p, hkv, d);
            using var dvg = device.Zeros("prefix_dv", 1, p, hkv, d);
            AttentionBackward(
                q.View(b0 * s * h * d, 1, n * s, h, d), level.Keys.View(g * p * hkv * d, 1, p, hkv, d), level.Values.View(g * p * hkv * d, 1, p, hkv, d),
                o.View(b0 * s * h * d, 1, n * s, h, d), lse.View(b0 * s * h, 1, n * s, h), dO.View(b0 * s * h * d, 1, n * s, h, d), dqg, dkg, dvg, causal: false, scale);
            var dqRows = dq.View(b0 * s * h * d, 1, n * s, h, d);
            Add(dqRows, dqg, dqRows);
            var dkSlot = dLevelKeys[li].View(g * p * hkv * d, 1, p, hkv, d);
            var dvSlot = dLevelValues[li].View(g * p * hkv * d, 1, p, hkv, d);
            Add(dkSlot, dkg, dkSlot);
            Add(dvSlot, dvg, dvSlot);
        }
    }

    private static int IndexOf(IReadOnlyList<PrefixLevel> levels, PrefixLevel level)
    {
        for (int i = 0; i < levels.Count; i++)
        {
            if (ReferenceEquals(levels[i], level)) return i;
        }

        return -1;
    }

    /// <summary>Each level's runs of contiguous sequences that read the same prefix: (level, prefix g, first sequence, count).</summary>
    private static IEnumerable<(PrefixLevel Level, int Group, int First, int Count)> Runs(string op, Tensor q, IReadOnlyList<PrefixLevel> levels)
    {
        if (q.Rank != 4) throw new ArgumentException($"{op}: q {q} must be (B, S, H, D)");
        int b = q.Dim(0);
        var runs = new List<(PrefixLevel, int, int, int)>();
        for (int l = 0; l < levels.Count; l++)
        {
            var level = levels[l];
            var k = level.Keys;
            if (k.Rank != 4 || k.Dim(3) != q.Dim(3) || !level.Values.Shape.SequenceEqual(k.Shape))
            {
                throw new ArgumentException($"{op}: level {l} keys {k} and values {level.Values} must both be (G, P, Hkv, D = {q.Dim(3)})");
            }

            if (level.GroupOfSequence.Length != b) throw new ArgumentException($"{op}: level {l} names a prefix for {level.GroupOfSequence.Length} sequences, the batch has {b}");
            var seen = new HashSet<int>();
            for (int i = 0; i < b;)
            {
                int g = level.GroupOfSequence[i];
                int j = i;
                while (j < b && level.GroupOfSequence[j] == g) j++;
                if (g < -1 || g >= k.Dim(0)) throw new ArgumentException($"{op}: level {l} sequence {i} reads prefix {g}, outside [-1, {k.Dim(0)})");
                if (g >= 0 && !seen.Add(g)) throw new ArgumentException($"{op}: level {l}: the sequences sharing prefix {g} must be contiguous in the batch");
                if (g >= 0) runs.Add((level, g, i, j - i));
                i = j;
            }
        }

        return runs;
    }
}
