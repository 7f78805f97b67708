using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>RMSNorm forward and backward. Reference: <see cref="RmsNormReference"/>.</summary>
public static class RmsNormKernels
{
    /// <summary>One thread per row.</summary>
    public static void ForwardKernel(
        Index1D r,
        ArrayView<float> x,    // (N, D)
        ArrayView<float> w,    // (D)
        ArrayView<float> y,    // (N, D)
        ArrayView<float> rstd, // (N)
        int dim,
        float eps)
    {
        int o = r * dim;
        float ss = 0f;
        for (int d = 0; d < dim; d++) ss += x[o + d] * x[o + d];
        float inv = XMath.Rsqrt(ss / dim + eps);
        rstd[r] = inv;
        for (int d = 0; d < dim; d++) y[o + d] = x[o + d] * inv * w[d];
    }

    /// <summary>dx, one thread per row.</summary>
    public static void BackwardInputKernel(
        Index1D r,
        ArrayView<float> dy,   // (N, D)
        ArrayView<float> x,    // (N, D)
        ArrayView<float> w,    // (D)
        ArrayView<float> rstd, // (N)
        ArrayView<float> dx,   // (N, D)
        int dim)
    {
        int o = r * dim;
        float inv = rstd[r];
        float dot = 0f;
        for (int d = 0; d < dim; d++) dot += dy[o + d] * w[d] * x[o + d];
        float k = inv * inv * inv * dot / dim;
        for (int d = 0; d < dim; d++) dx[o + d] = inv * w[d] * dy[o + d] - x[o + d] * k;
    }

    /// <summary>dw, one thread per column, rows summed in order (deterministic, no atomics).</summary>
    public static void BackwardWeightKernel(
        Index1D d,
        ArrayView<float> dy,   // (N, D)
        ArrayView<float> x,    // (N, D)
        ArrayView<float> rstd, // (N)
        ArrayView<float> dw,   // (D)
        int rows,
        int dim)
    {
        float acc = 0f;
        for (int r = 0; r < rows; r++) acc += dy[r * dim + d] * x[r * dim + d] * rstd[r];
        dw[d] = acc;
    }
}
