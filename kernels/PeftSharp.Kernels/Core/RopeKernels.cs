using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>
/// Rescaled rotary frequencies, as transformers' rope_scaling computes them: <see cref="None"/>; <see cref="Linear"/>
/// (inv_freq / factor); <see cref="Llama3"/> (Llama 3.1: wavelengths above original / low_freq_factor divided by the
/// factor, below original / high_freq_factor kept, in between blended by (original / wavelength - low) / (high - low)).
/// </summary>
public struct RopeScaling
{
    public const int None = 0;
    public const int Linear = 1;
    public const int Llama3 = 2;

    public int Type;
    public float Factor;
    public float LowFreqFactor;
    public float HighFreqFactor;
    public float OriginalMaxPositions;

    /// <summary>One inverse frequency rescaled (fp32, as transformers computes the table).</summary>
    public static float Apply(float invFreq, RopeScaling s)
    {
        if (s.Type == Linear) return invFreq / s.Factor;
        if (s.Type != Llama3) return invFreq;
        float wavelen = 2f * XMath.PI / invFreq;
        if (wavelen > s.OriginalMaxPositions / s.LowFreqFactor) return invFreq / s.Factor;
        if (wavelen < s.OriginalMaxPositions / s.HighFreqFactor) return invFreq;
        float smooth = (s.OriginalMaxPositions / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
        return (1f - smooth) * invFreq / s.Factor + smooth * invFreq;
    }
}

/// <summary>Rotary embedding. Reference: <see cref="RopeReference"/>.</summary>
public static class RopeKernels
{
    /// <summary>
    /// One thread per (token, head, pair). inv_freq and the angle are computed in fp32, as transformers does.
    /// <paramref name="sign"/> is +1 forward and -1 for the inverse rotation (the backward pass).
    /// </summary>
    public static void ForwardKernel(
        Index1D index,               // over N * H * (D/2)
        ArrayView<float> x,          // (N, H, D)
        ArrayView<int> positions,    // (N)
        ArrayView<float> y,          // (N, H, D)
        int heads,
        int dim,
        float logTheta,
        float sign,
        RopeScaling scaling)
    {
        int half = dim / 2;
        int i = index % half;
        int nh = index / half;
        int n = nh / heads;
        int o = nh * dim;
        float invFreq = RopeScaling.Apply(XMath.Exp(-(2f * i / dim) * logTheta), scaling);
        float angle = positions[n] * invFreq;
        float cos = XMath.Cos(angle);
        float sin = sign * XMath.Sin(angle);
        float x1 = x[o + i];
        float x2 = x[o + i + half];
        y[o + i] = x1 * cos - x2 * sin;
        y[o + i + half] = x2 * cos + x1 * sin;
    }
}
