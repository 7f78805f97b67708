using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

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
