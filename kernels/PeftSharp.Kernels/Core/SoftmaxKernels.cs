using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>Row softmax, one thread per row. Reference: <see cref="SoftmaxReference"/>.</summary>
public static class SoftmaxKernels
{
    public static void ForwardKernel(Index1D r, ArrayView<float> x, ArrayView<float> y, int cols)
    {
        int o = r * cols;
        float max = float.NegativeInfinity;
        for (int c = 0; c < cols; c++) max = XMath.Max(max, x[o + c]);
        float sum = 0f;
        for (int c = 0; c < cols; c++)
        {
            float e = XMath.Exp(x[o + c] - max);
            y[o + c] = e;
            sum += e;
        }

        float inv = 1f / sum;
        for (int c = 0; c < cols; c++) y[o + c] *= inv;
    }

    public static void BackwardKernel(Index1D r, ArrayView<float> y, ArrayView<float> dy, ArrayView<float> dx, int cols)
    {
        int o = r * cols;
        float dot = 0f;
        for (int c = 0; c < cols; c++) dot += dy[o + c] * y[o + c];
        for (int c = 0; c < cols; c++) dx[o + c] = y[o + c] * (dy[o + c] - dot);
    }
}
