using System.Runtime.Intrinsics;
using NUnit.Framework;
using PeftSharp.Engine.Cpu;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Engine.Cpu;

/// <summary>
/// The CPU backend's own single-precision exponential (softmax in attention, sigmoid in SiLU and SwiGLU), against
/// double-precision Math.Exp: error in units in the last place, the edges of the float range, and the passes built on it.
/// </summary>
public sealed class VectorExpTests
{
    // Range reduction leaves |r| <= ln2 / 2 exactly; Cephes' minimax polynomial and the rounded FMAs of its evaluation
    // stay within one unit in the last place (3 million random points measured while choosing it; a Taylor polynomial
    // of degree 6 reached 3).
    private const int MaxUlps = 1;

    private static int Ulps(float got, double exact)
    {
        float e = (float)exact;
        if (got == e) return 0;
        return (int)Math.Abs((long)BitConverter.SingleToInt32Bits(got) - BitConverter.SingleToInt32Bits(e));
    }

    private static IEnumerable<float> Grid()
    {
        // Dense over the normal range, plus the points where range reduction changes n and the rounding boundary of n.
        for (double x = -87.3; x <= 88.7; x += 0.01237) yield return (float)x;
        for (int n = -125; n <= 127; n++)
        {
            float half = (float)((n + 0.5) * Math.Log(2));
            yield return half;
            yield return MathF.BitDecrement(half);
            yield return MathF.BitIncrement(half);
        }

        foreach (float x in new[] { 0f, -0f, 1e-30f, -1e-30f, 1e-7f, -1e-7f, 1f, -1f }) yield return x;
    }

    [Test]
    public void Exp_AllWidths_WithinOneUlpOfDoublePrecision()
    {
        var xs = Grid().ToArray();
        int worst = 0;
        float worstAt = 0;
        foreach (float x in xs)
        {
            double exact = Math.Exp(x);
            var widths = new List<(string Name, float Value)> { ("scalar", VectorExp.Exp(x)) };
            if (Vector256.IsHardwareAccelerated) widths.Add(("Vector256", VectorExp.Exp(Vector256.Create(x)).GetElement(3)));
            if (Vector512.IsHardwareAccelerated) widths.Add(("Vector512", VectorExp.Exp(Vector512.Create(x)).GetElement(11)));
            foreach (var (name, value) in widths)
            {
                int u = Ulps(value, exact);
                Assert.That(u, Is.LessThanOrEqualTo(MaxUlps), $"{name} exp({x:R}) = {value:R}, exact {exact:R}");
                if (u > worst) (worst, worstAt) = (u, x);
            }
        }

        TestContext.Out.WriteLine($"{xs.Length} points, worst {worst} ulp at x = {worstAt:R}");
    }

    [Test]
    public void Exp_RangeEdges_ZeroInfinityAndNaN()
    {
        foreach (float x in new[] { float.NegativeInfinity, -1e30f, -104f, -87.4f })
        {
            Assert.That(VectorExp.Exp(x), Is.EqualTo(0f), $"exp({x})");
        }

        foreach (float x in new[] { float.PositiveInfinity, 1e30f, 89f })
        {
            Assert.That(VectorExp.Exp(x), Is.EqualTo(float.PositiveInfinity), $"exp({x})");
        }

        Assert.That(float.IsNaN(VectorExp.Exp(float.NaN)), "exp(NaN) must stay NaN (a diverged run must show it)");
        // The largest finite result and the smallest normal one stay within the stated error.
        Assert.That(Ulps(VectorExp.Exp(88.7f), Math.Exp(88.7f)), Is.LessThanOrEqualTo(MaxUlps));
        Assert.That(Ulps(VectorExp.Exp(-87.3f), Math.Exp(-87.3f)), Is.LessThanOrEqualTo(MaxUlps));
    }

    // Lengths around both vector widths: tails of every size, none, and rows shorter than one vector.
    [TestCase(1)]
    [TestCase(7)]
    [TestCase(8)]
    [TestCase(15)]
    [TestCase(16)]
    [TestCase(17)]
    [TestCase(40)]
    [TestCase(127)]
    public unsafe void ExpShifted_And_Max_MatchDoublePrecision_LeaveThePastEndAlone(int n)
    {
        var row = TestData.Uniform(n + 3, 11 + n).Select(v => 20f * v).ToArray();
        row[n] = row[n + 1] = row[n + 2] = float.NaN; // past the end: must be neither read into the sum nor written
        var x = row.ToArray();
        float max, sum;
        fixed (float* p = row)
        {
            max = VectorExp.Max(p, n);
            sum = VectorExp.ExpShifted(p, n, max);
        }

        Assert.That(max, Is.EqualTo(x.Take(n).Max()));
        double exactSum = 0;
        for (int j = 0; j < n; j++)
        {
            double e = Math.Exp(x[j] - max); // of the float difference, as the kernel computes it
            exactSum += e;
            Assert.That(Ulps(row[j], e), Is.LessThanOrEqualTo(MaxUlps), $"element {j} of {n}");
        }

        Assert.That(sum, Is.EqualTo(exactSum).Within(1e-6 * exactSum), "sum");
        Assert.That(row.Skip(n).All(float.IsNaN), "elements past n were written");
    }

    [TestCase(1)]
    [TestCase(23)]
    [TestCase(4096)]
    public void Sigmoid_MatchesDoublePrecision_InPlaceToo(int n)
    {
        var x = TestData.Uniform(n, 5 + n).Select(v => 30f * v).ToArray();
        if (n > 2) (x[0], x[1]) = (-100f, 100f);
        var y = new float[n];
        VectorExp.Sigmoid(x, y);
        var expected = x.Select(v => (float)(1 / (1 + Math.Exp(-(double)v)))).ToArray();
        Check.Close(y, expected, Tolerances.Transcendental, "sigmoid");
        var inPlace = x.ToArray();
        VectorExp.Sigmoid(inPlace, inPlace);
        Assert.That(inPlace, Is.EqualTo(y), "in place");
    }
}
