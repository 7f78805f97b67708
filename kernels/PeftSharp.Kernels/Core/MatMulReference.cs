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
}
