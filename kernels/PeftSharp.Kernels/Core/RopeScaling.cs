using ILGPU.Algorithms;

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
