namespace PeftSharp.Kernels.Core;

/// <summary>The specification of matmul: plain loops, double accumulation.</summary>
public static class MatMulReference
{
    /// <summary>c (Batch, M, N) = alpha * op(a) op(b) + beta * c. With beta = 0, c is not read (BLAS semantics).</summary>
    public static void Forward(
        ReadOnlySpan<float> a, // (Batch, M, K), or (Batch, K, M) transposed
        ReadOnlySpan<float> b, // (Batch|1, K, N), or (Batch|1, N, K) transposed
        Span<float> c,         // (Batch, M, N)
        MatMulShape s, float alpha = 1f, float beta = 0f)
    {
        for (int bt = 0; bt < s.Batch; bt++)
        {
            for (int i = 0; i < s.M; i++)
            {
                for (int j = 0; j < s.N; j++)
                {
                    double acc = 0;
                    for (int p = 0; p < s.K; p++)
                    {
                        acc += (double)a[s.IndexA(bt, i, p)] * b[s.IndexB(bt, p, j)];
                    }

                    int ci = bt * s.StrideC + i * s.N + j;
                    c[ci] = beta == 0f ? (float)(alpha * acc) : (float)(alpha * acc + (double)beta * c[ci]);
                }
            }
        }
    }

    /// <summary>
    /// y (M, N) = silu(x wGate^T) * (x wUp^T), the fused gate/up projection of a Llama MLP: both products and the
    /// SwiGLU in double precision, rounded once. x (M, K); wGate, wUp (N, K).
    /// </summary>
    public static void LinearSwiGlu(ReadOnlySpan<float> x, ReadOnlySpan<float> wGate, ReadOnlySpan<float> wUp, Span<float> y, int m, int n, int k)
    {
        for (int i = 0; i < m; i++)
        {
            for (int j = 0; j < n; j++)
            {
                double g = 0, u = 0;
                for (int p = 0; p < k; p++)
                {
                    g += (double)x[i * k + p] * wGate[j * k + p];
                    u += (double)x[i * k + p] * wUp[j * k + p];
                }

                y[i * n + j] = (float)(ElementwiseReference.Silu(g) * u);
            }
        }
    }
}
