namespace PeftSharp.Kernels.Core;

/// <summary>
/// Dimensions of a (batched) matmul c = alpha * op(a) * op(b) + beta * c, passed to kernels by value.
/// op(a) is (M, K): a is stored (M, K), or (K, M) when <see cref="TransposeA"/> is 1.
/// op(b) is (K, N): b is stored (K, N), or (N, K) when <see cref="TransposeB"/> is 1.
/// Batch strides are in elements; a stride of 0 broadcasts that operand over the batch.
/// </summary>
public readonly struct MatMulShape
{
    public MatMulShape(int batch, int m, int n, int k, bool transposeA, bool transposeB, bool broadcastB)
    {
        Batch = batch;
        M = m;
        N = n;
        K = k;
        TransposeA = transposeA ? 1 : 0;
        TransposeB = transposeB ? 1 : 0;
        StrideA = m * k;
        StrideB = broadcastB ? 0 : k * n;
        StrideC = m * n;
    }

    public int Batch { get; }
    public int M { get; }
    public int N { get; }
    public int K { get; }
    /// <summary>1 when a is stored (K, M). An int, not a bool, so every ILGPU backend takes it as is.</summary>
    public int TransposeA { get; }
    /// <summary>1 when b is stored (N, K).</summary>
    public int TransposeB { get; }
    public int StrideA { get; }
    public int StrideB { get; }
    public int StrideC { get; }

    /// <summary>Offset of op(a)[i, p] in batch element <paramref name="batch"/>.</summary>
    public int IndexA(int batch, int i, int p) => batch * StrideA + (TransposeA != 0 ? p * M + i : i * K + p);

    /// <summary>Offset of op(b)[p, j] in batch element <paramref name="batch"/>.</summary>
    public int IndexB(int batch, int p, int j) => batch * StrideB + (TransposeB != 0 ? j * K + p : p * N + j);

    public long Flops => 2L * Batch * M * N * K;
}
