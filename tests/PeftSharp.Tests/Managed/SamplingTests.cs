using NUnit.Framework;
using PeftSharp.Serving;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// Sampling without sorting the vocabulary: with a top-k or top-p cut the draw is the one the plain way gives (every
/// id sorted by logit, most likely first, ties by id; cut; walk), token for token from the same random stream; without
/// a cut the tokens' frequencies are their softmax probabilities.
/// </summary>
public sealed class SamplingTests
{
    /// <summary>The plain way: the whole vocabulary sorted (a stable sort, descending), then cut and walked.</summary>
    private static int Plain(float[] logits, float temperature, int topK, float topP, Random rng)
    {
        var order = Enumerable.Range(0, logits.Length).OrderByDescending(i => logits[i]).ToList();
        if (topK > 0) order = order.Take(topK).ToList();
        double max = logits[order[0]];
        var probs = order.Select(i => Math.Exp((logits[i] - max) / temperature)).ToList();
        double total = probs.Sum();
        if (topP < 1f)
        {
            double cum = 0;
            int keep = 0;
            while (keep < probs.Count && cum < topP * total)
            {
                cum += probs[keep];
                keep++;
            }

            order = order.Take(Math.Max(1, keep)).ToList();
            probs = probs.Take(order.Count).ToList();
            total = probs.Sum();
        }

        double r = rng.NextDouble() * total;
        for (int i = 0; i < order.Count; i++)
        {
            r -= probs[i];
            if (r <= 0) return order[i];
        }

        return order[^1];
    }

    [TestCase(1000, 0.8f, 50, 1f, TestName = "TopK50_V1000")]
    [TestCase(1000, 1f, 0, 0.9f, TestName = "TopP09_V1000")]
    [TestCase(5000, 0.3f, 0, 0.95f, TestName = "TopP095_LowTemperature_V5000")]
    [TestCase(3000, 1.2f, 400, 0.5f, TestName = "TopK400ThenTopP05_V3000")]
    [TestCase(7, 1f, 0, 0.99f, TestName = "TopP_SmallVocabulary")]
    [TestCase(1000, 1f, 1, 1f, TestName = "TopK1_IsGreedy")]
    [TestCase(1000, 5f, 0, 0.999f, TestName = "TopP_FlatDistribution_LooksPastTheFirstCandidates")]
    public void WithACut_DrawsWhatTheSortedVocabularyGives(int vocabulary, float temperature, int topK, float topP)
    {
        var data = new Random(vocabulary + topK);
        // Logits on a coarse grid from -4 to 4, so ties happen (their order by id matters) and signs differ.
        var logits = Enumerable.Range(0, vocabulary).Select(_ => (float)Math.Round(data.NextDouble() * 8 - 4, 1)).ToArray(); // negative ones too
        var ours = new Random(3);
        var plain = new Random(3);
        for (int draw = 0; draw < 300; draw++)
        {
            Assert.That(Generator.Draw(logits, temperature, topK, topP, ours), Is.EqualTo(Plain(logits, temperature, topK, topP, plain)), $"draw {draw}");
        }
    }

    [Test]
    public void WithoutACut_FrequenciesAreTheSoftmaxProbabilities()
    {
        var logits = new[] { 2f, 0f, 1f, -1f, 2f, 0.5f };
        double temperature = 0.7;
        var weights = logits.Select(l => Math.Exp(l / temperature)).ToArray();
        var expected = weights.Select(w => w / weights.Sum()).ToArray();
        var rng = new Random(11);
        const int draws = 60000;
        var counts = new int[logits.Length];
        for (int i = 0; i < draws; i++) counts[Generator.Draw(logits, (float)temperature, 0, 1f, rng)]++;
        // Binomial standard error at 60,000 draws is at most 0.002; 5 of them bound a false failure below one in a million.
        const double Tolerance = 0.01;
        for (int t = 0; t < logits.Length; t++) Assert.That(counts[t] / (double)draws, Is.EqualTo(expected[t]).Within(Tolerance), $"token {t}");
    }
}
