using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Optim;

/// <summary>Optimizer steps, one thread per parameter. Reference: <see cref="OptimizerReference"/>.</summary>
public static class OptimizerKernels
{
    public static void AdamWKernel(
        Index1D i,
        ArrayView<float> p, // parameter
        ArrayView<float> g, // gradient
        ArrayView<float> m, // first moment
        ArrayView<float> v, // second moment
        float lr, float beta1, float beta2, float eps, float weightDecay, float bc1, float bc2)
    {
        float gi = g[i];
        float pi = p[i] * (1f - lr * weightDecay);
        float mi = beta1 * m[i] + (1f - beta1) * gi;
        float vi = beta2 * v[i] + (1f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - lr * (mi / bc1) / (XMath.Sqrt(vi / bc2) + eps);
    }

    /// <summary>SGD; <paramref name="buf"/> is read only when momentum is not 0.</summary>
    public static void SgdKernel(
        Index1D i,
        ArrayView<float> p,   // parameter
        ArrayView<float> g,   // gradient
        ArrayView<float> buf, // momentum buffer (any length when momentum is 0)
        float lr, float momentum, float weightDecay, int nesterov)
    {
        float gi = g[i] + weightDecay * p[i];
        if (momentum != 0f)
        {
            float bi = momentum * buf[i] + gi;
            buf[i] = bi;
            gi = nesterov != 0 ? gi + momentum * bi : bi;
        }

        p[i] -= lr * gi;
    }
}
