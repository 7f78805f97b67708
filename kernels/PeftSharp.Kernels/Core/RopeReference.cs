namespace PeftSharp.Kernels.Core;

/// <summary>
/// Specification of rotary position embedding in transformers' rotate-half form:
/// inv_freq_i = theta^(-2i/D), angle = pos * inv_freq_i, y[i] = x[i] cos - x[i + D/2] sin,
/// y[i + D/2] = x[i + D/2] cos + x[i] sin, for i &lt; D/2. The inverse (the backward pass) rotates by -angle.
/// </summary>
public static class RopeReference
{
    public static void Forward(
        ReadOnlySpan<float> x,       // (N, H, D), N tokens
        ReadOnlySpan<int> positions, // (N)
        Span<float> y,               // (N, H, D)
        int tokens, int heads, int dim, float theta, bool inverse, RopeScaling scaling = default)
    {
        int half = dim / 2;
        for (int n = 0; n < tokens; n++)
        {
            for (int h = 0; h < heads; h++)
            {
                int o = (n * heads + h) * dim;
                for (int i = 0; i < half; i++)
                {
                    double angle = positions[n] * InvFreq(Math.Pow(theta, -2.0 * i / dim), scaling);
                    double cos = Math.Cos(angle);
                    double sin = inverse ? -Math.Sin(angle) : Math.Sin(angle);
                    double x1 = x[o + i];
                    double x2 = x[o + i + half];
                    y[o + i] = (float)(x1 * cos - x2 * sin);
                    y[o + i + half] = (float)(x2 * cos + x1 * sin);
                }
            }
        }
    }

    /// <summary>transformers' rope_scaling in double: linear divides by the factor; llama3 as <see cref="RopeScaling"/> describes.</summary>
    public static double InvFreq(double inv, RopeScaling s)
    {
        if (s.Type == RopeScaling.Linear) return inv / s.Factor;
        if (s.Type != RopeScaling.Llama3) return inv;
        double wavelen = 2 * Math.PI / inv;
        double low = (double)s.OriginalMaxPositions / s.LowFreqFactor, high = (double)s.OriginalMaxPositions / s.HighFreqFactor;
        if (wavelen > low) return inv / s.Factor;
        if (wavelen < high) return inv;
        double smooth = ((double)s.OriginalMaxPositions / wavelen - s.LowFreqFactor) / ((double)s.HighFreqFactor - s.LowFreqFactor);
        return (1 - smooth) * inv / s.Factor + smooth * inv;
    }
}
