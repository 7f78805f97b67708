namespace PeftSharp.Bench;

/// <summary>Setup-time checks: never time a wrong kernel.</summary>
internal static class Validate
{
    /// <summary>Compares sampled elements of a result with a double-precision value computed for each.</summary>
    public static void Sampled(string what, float[] actual, Func<int, double> expected, double tolerance, int samples = 64)
    {
        var rng = new Random(1);
        for (int s = 0; s < samples; s++)
        {
            int i = s == 0 ? 0 : s == 1 ? actual.Length - 1 : rng.Next(actual.Length);
            double e = expected(i);
            if (!(Math.Abs(actual[i] - e) <= tolerance * (1 + Math.Abs(e))))
            {
                throw new InvalidOperationException($"{what}: element {i} is {actual[i]}, expected {e}; refusing to time a wrong result");
            }
        }
    }

    public static float[] Uniform(int n, int seed)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = 2f * (float)rng.NextDouble() - 1f;
        return a;
    }
}
