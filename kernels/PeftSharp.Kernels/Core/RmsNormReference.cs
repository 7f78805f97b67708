namespace PeftSharp.Kernels.Core;

/// <summary>Specification of RMSNorm (transformers' LlamaRMSNorm): y = x * rsqrt(mean(x^2) + eps) * w.</summary>
public static class RmsNormReference
{
    public static void Forward(
        ReadOnlySpan<float> x, // (N, D)
        ReadOnlySpan<float> w, // (D)
        Span<float> y,         // (N, D)
        Span<float> rstd,      // (N): rsqrt(mean(x^2) + eps), kept for the backward pass
        int rows, int dim, float eps)
    {
        for (int r = 0; r < rows; r++)
        {
            double ss = 0;
            for (int d = 0; d < dim; d++) ss += (double)x[r * dim + d] * x[r * dim + d];
            double inv = 1.0 / Math.Sqrt(ss / dim + eps);
            rstd[r] = (float)inv;
            for (int d = 0; d < dim; d++) y[r * dim + d] = (float)(x[r * dim + d] * inv * w[d]);
        }
    }

    /// <summary>
    /// dx_k = r w_k dy_k - x_k r^3 / D * sum_d(dy_d w_d x_d); dw_d = sum over rows of dy_d x_d r. Overwrites dx and dw.
    /// </summary>
    public static void Backward(
        ReadOnlySpan<float> dy, ReadOnlySpan<float> x, ReadOnlySpan<float> w, ReadOnlySpan<float> rstd,
        Span<float> dx, Span<float> dw, int rows, int dim)
    {
        var dwAcc = new double[dim];
        for (int r = 0; r < rows; r++)
        {
            double inv = rstd[r];
            double dot = 0;
            for (int d = 0; d < dim; d++) dot += (double)dy[r * dim + d] * w[d] * x[r * dim + d];
            for (int d = 0; d < dim; d++)
            {
                int i = r * dim + d;
                dx[i] = (float)(inv * w[d] * dy[i] - x[i] * inv * inv * inv * dot / dim);
                dwAcc[d] += (double)dy[i] * x[i] * inv;
            }
        }

        for (int d = 0; d < dim; d++) dw[d] = (float)dwAcc[d];
    }
}
