using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>Elementwise ILGPU kernels, one thread per element. Reference: <see cref="ElementwiseReference"/>.</summary>
public static class ElementwiseKernels
{
    public static void AddKernel(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> y) => y[i] = a[i] + b[i];

    public static void MulKernel(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> y) => y[i] = a[i] * b[i];

    public static void ScaleKernel(Index1D i, ArrayView<float> x, float s, ArrayView<float> y) => y[i] = x[i] * s;

    /// <summary>y[r, j] = x[r, j] * c[j]: x, y (rows, cols), c (cols). One thread per element.</summary>
    public static void ScaleColumnsKernel(Index1D i, ArrayView<float> x, ArrayView<float> c, ArrayView<float> y, int cols) => y[i] = x[i] * c[i % cols];

    /// <summary>y += alpha * x.</summary>
    public static void AxpyKernel(Index1D i, float alpha, ArrayView<float> x, ArrayView<float> y) => y[i] += alpha * x[i];

    public static void FillKernel(Index1D i, ArrayView<float> y, float value) => y[i] = value;

    /// <summary>acc += |x|: accumulated gradient magnitudes (mask selection).</summary>
    public static void AbsAddKernel(Index1D i, ArrayView<float> x, ArrayView<float> acc) => acc[i] += XMath.Abs(x[i]);

    private static float Sigmoid(float x) => 1f / (1f + XMath.Exp(-x));

    public static void SiluKernel(Index1D i, ArrayView<float> x, ArrayView<float> y) => y[i] = x[i] * Sigmoid(x[i]);

    /// <summary>y = tanh(x), as 1 - 2 / (e^(2x) + 1) (exact limits at +-infinity).</summary>
    public static void TanhKernel(Index1D i, ArrayView<float> x, ArrayView<float> y) => y[i] = 1f - 2f / (XMath.Exp(2f * x[i]) + 1f);

    /// <summary>dx = dy * (1 - y^2) from the forward's output y.</summary>
    public static void TanhBackwardKernel(Index1D i, ArrayView<float> y, ArrayView<float> dy, ArrayView<float> dx) => dx[i] = dy[i] * (1f - y[i] * y[i]);

    public static void SiluBackwardKernel(Index1D i, ArrayView<float> x, ArrayView<float> dy, ArrayView<float> dx)
    {
        float s = Sigmoid(x[i]);
        dx[i] = dy[i] * s * (1f + x[i] * (1f - s));
    }

    public static void SwiGluKernel(Index1D i, ArrayView<float> gate, ArrayView<float> up, ArrayView<float> y)
    {
        float g = gate[i];
        y[i] = g * Sigmoid(g) * up[i];
    }

    public static void SwiGluBackwardKernel(
        Index1D i, ArrayView<float> gate, ArrayView<float> up, ArrayView<float> dy, ArrayView<float> dGate, ArrayView<float> dUp)
    {
        float g = gate[i];
        float s = Sigmoid(g);
        dGate[i] = dy[i] * up[i] * s * (1f + g * (1f - s));
        dUp[i] = dy[i] * g * s;
    }

    /// <summary>Elements per thread of the partial reductions below.</summary>
    public const int ReduceChunk = 1024;

    /// <summary>
    /// partial[c] = sum of x over chunk c (or of x^2 when <paramref name="squares"/> is 1). The host adds the partials
    /// in double. No atomics: PoCL cannot build them, and the order is fixed, so results are deterministic.
    /// </summary>
    public static void PartialSumKernel(Index1D c, ArrayView<float> x, ArrayView<float> partial, int squares)
    {
        long begin = (long)(int)c * ReduceChunk;
        long end = XMath.Min(begin + ReduceChunk, x.Length);
        float acc = 0f;
        for (long i = begin; i < end; i++)
        {
            float v = x[i];
            acc += squares != 0 ? v * v : v;
        }

        partial[c] = acc;
    }
}
