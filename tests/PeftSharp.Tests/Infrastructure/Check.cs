using NUnit.Framework;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>Comparisons that report the worst element and its index.</summary>
public static class Check
{
    /// <summary>
    /// NaN and infinity positions must match exactly; then |a - e| &lt;= atol + rtol |e| everywhere.
    /// </summary>
    public static void Close(ReadOnlySpan<float> actual, ReadOnlySpan<float> expected, (double Atol, double Rtol) tol, string what)
    {
        Assert.That(actual.Length, Is.EqualTo(expected.Length), $"{what}: length");
        int worst = -1;
        double worstExcess = 0, worstError = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            float a = actual[i], e = expected[i];
            if (float.IsNaN(e) || float.IsInfinity(e) || float.IsNaN(a) || float.IsInfinity(a))
            {
                if (!(a.Equals(e)))
                {
                    Assert.Fail($"{what}: element {i} is {a}, expected {e} (NaN/infinity positions must match)");
                }

                continue;
            }

            double err = Math.Abs((double)a - e);
            double excess = err - (tol.Atol + tol.Rtol * Math.Abs(e));
            if (worst < 0 || excess > worstExcess)
            {
                worst = i;
                worstExcess = excess;
                worstError = err;
            }
        }

        if (worst >= 0 && worstExcess > 0)
        {
            Assert.Fail($"{what}: element {worst} is {actual[worst]}, expected {expected[worst]} (error {worstError:G3} > atol {tol.Atol:G3} + rtol {tol.Rtol:G3} * |expected|)");
        }
    }

    /// <summary>Every element of the padding around an output still holds the NaN sentinel.</summary>
    public static void PaddingUntouched(float[] padding, string what)
    {
        for (int i = 0; i < padding.Length; i++)
        {
            if (!float.IsNaN(padding[i])) Assert.Fail($"{what}: out-of-bounds write, padding element {i} is {padding[i]}");
        }
    }
}

/// <summary>Seeded test data.</summary>
public static class TestData
{
    public static float[] Uniform(int n, int seed, float lo = -1f, float hi = 1f)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = lo + (float)rng.NextDouble() * (hi - lo);
        return a;
    }

    public static int[] Ints(int n, int seed, int max)
    {
        var rng = new Random(seed);
        var a = new int[n];
        for (int i = 0; i < n; i++) a[i] = rng.Next(max);
        return a;
    }
}
