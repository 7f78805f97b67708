using PeftSharp.Model;

namespace PeftSharp.Serving;

/// <summary>Generation from one prompt, and the sampling every request uses (greedy, temperature, top-k, top-p).</summary>
public static class Generator
{
    public static string Greedy(LlamaModel model, string prompt, int maxTokens) => Sample(model, prompt, maxTokens, temperature: 0f, topK: 0, topP: 1f, seed: 0);

    /// <summary>
    /// Samples up to <paramref name="maxTokens"/> tokens after [BOS] prompt, stopping at EOS (temperature 0 is greedy):
    /// one request through <see cref="BatchGenerator"/>, the path every batch of requests takes.
    /// </summary>
    public static string Sample(LlamaModel model, string prompt, int maxTokens, float temperature, int topK, float topP, int seed) =>
        BatchGenerator.Generate(model, new[] { new GenerationRequest(prompt, null, maxTokens, temperature, topK, topP, seed) }, sharing: PrefixSharing.Off)[0].Completion;

    /// <summary>The request's next token from <paramref name="logits"/>: greedy at temperature 0, else drawn with its sampling.</summary>
    internal static int Next(GenerationRequest r, float[] logits, Random rng) =>
        r.Temperature <= 0f ? ArgMax(logits) : Draw(logits, r.Temperature, r.TopK, r.TopP, rng);

    internal static int ArgMax(float[] v)
    {
        int best = 0;
        for (int i = 1; i < v.Length; i++)
        {
            if (v[i] > v[best]) best = i;
        }

        return best;
    }

    /// <summary>
    /// A token drawn from softmax(logits / temperature), cut to the <paramref name="topK"/> likeliest and then to the
    /// fewest likeliest whose mass reaches <paramref name="topP"/>. Only what a cut needs is ordered (the candidates of
    /// top-k, or of top-p, most likely first, ties by id), so a 128K vocabulary costs one pass, not a sort per token;
    /// without a cut the draw walks the vocabulary in id order.
    /// </summary>
    internal static int Draw(float[] logits, float temperature, int topK, float topP, Random rng)
    {
        int v = logits.Length;
        float max = float.NegativeInfinity;
        foreach (float l in logits) max = Math.Max(max, l);
        // The weights once (a 128K vocabulary's exponentials are most of a draw's cost).
        var weights = new double[v];
        for (int i = 0; i < v; i++) weights[i] = Math.Exp((logits[i] - max) / temperature);
        double Weight(int i) => weights[i];
        if (topK <= 0 && topP >= 1f)
        {
            double all = 0;
            for (int i = 0; i < v; i++) all += Weight(i);
            double u = rng.NextDouble() * all;
            int last = 0;
            for (int i = 0; i < v; i++)
            {
                double w = Weight(i);
                if (w > 0) last = i;
                u -= w;
                if (u <= 0) return i;
            }

            return last;
        }

        // Top-p over the whole vocabulary normalises by all of it; after top-k by the k kept.
        double vocabularyMass = 0;
        if (topK <= 0)
        {
            for (int i = 0; i < v; i++) vocabularyMass += Weight(i);
        }

        int want = topK > 0 ? Math.Min(topK, v) : NucleusBound(logits, weights, max, topP * vocabularyMass);
        while (true)
        {
            var order = Likeliest(logits, want);
            var probs = order.Select(Weight).ToList();
            // Summed in the candidates' order where they are the whole cut set (the plain way's order, so the cut lands on
            // the same token even at a rounding tie); the vocabulary's mass otherwise.
            double total = topK > 0 || order.Length == v ? probs.Sum() : vocabularyMass;
            int keep = probs.Count;
            if (topP < 1f)
            {
                double cum = 0;
                keep = 0;
                while (keep < probs.Count && cum < topP * total)
                {
                    cum += probs[keep];
                    keep++;
                }

                if (cum < topP * total && order.Length < (topK > 0 ? Math.Min(topK, v) : v))
                {
                    want = Math.Min(v, want * 4); // the mass lies past these candidates: look at more
                    continue;
                }

                keep = Math.Max(1, keep);
                total = probs.Take(keep).Sum();
            }

            double r = rng.NextDouble() * total;
            for (int i = 0; i < keep; i++)
            {
                r -= probs[i];
                if (r <= 0) return order[i];
            }

            return order[keep - 1];
        }
    }

    /// <summary>
    /// How many of the likeliest ids surely hold <paramref name="mass"/> of the weight: the weights binned by logit
    /// (2,048 bins from the largest down), whole bins counted from the top until their mass reaches it. One pass, so a
    /// nucleus of any size costs one selection of that many.
    /// </summary>
    private static int NucleusBound(float[] logits, double[] weights, float max, double mass)
    {
        const int Bins = 2048;
        float min = float.PositiveInfinity;
        foreach (float l in logits) min = Math.Min(min, l);
        double range = (double)max - min;
        if (range <= 0) return logits.Length;
        var binMass = new double[Bins];
        var binCount = new int[Bins];
        for (int i = 0; i < logits.Length; i++)
        {
            int b = Math.Min(Bins - 1, (int)((max - logits[i]) / range * Bins));
            binMass[b] += weights[i];
            binCount[b]++;
        }

        double cum = 0;
        int count = 0;
        for (int b = 0; b < Bins; b++)
        {
            cum += binMass[b];
            count += binCount[b];
            if (cum >= mass) break;
        }

        return Math.Max(1, count);
    }

    /// <summary>The <paramref name="count"/> ids with the largest logits, most likely first, ties by lower id (a bounded heap; a sort when most are wanted).</summary>
    internal static int[] Likeliest(float[] logits, int count)
    {
        int v = logits.Length;
        // Descending logit, then ascending id: the order LINQ's stable OrderByDescending gave.
        int Compare(int a, int b) => logits[a] != logits[b] ? logits[b].CompareTo(logits[a]) : a.CompareTo(b);
        if (4L * count >= v)
        {
            // One primitive sort of (descending logit, id) packed in a long: the logit's bits made order-preserving and
            // inverted in the high half, the id in the low half.
            var keys = new long[v];
            for (int i = 0; i < v; i++)
            {
                int bits = BitConverter.SingleToInt32Bits(logits[i] + 0f); // + 0f: -0 becomes +0, which compares equal to it
                bits ^= (bits >> 31) & int.MaxValue; // as signed ints, now in the floats' order
                keys[i] = ((long)~bits << 32) | (uint)i;
            }

            Array.Sort(keys);
            var all = new int[count];
            for (int j = 0; j < count; j++) all[j] = (int)(keys[j] & uint.MaxValue);
            return all;
        }

        // A min-heap of the best so far: its root is the worst kept (lowest logit, then highest id).
        var heap = new PriorityQueue<int, int>(count + 1, Comparer<int>.Create((a, b) => Compare(b, a)));
        for (int i = 0; i < v; i++)
        {
            if (heap.Count < count) heap.Enqueue(i, i);
            else if (Compare(i, heap.Peek()) < 0) heap.EnqueueDequeue(i, i);
        }

        var best = new int[heap.Count];
        for (int j = best.Length - 1; j >= 0; j--) best[j] = heap.Dequeue();
        return best;
    }
}
