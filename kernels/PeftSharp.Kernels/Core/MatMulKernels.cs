using ILGPU;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>ILGPU matmul kernels. Reference: <see cref="MatMulReference"/>.</summary>
public static class MatMulKernels
{
    /// <summary>Tile edge of <see cref="TiledKernel"/>; its groups are Tile x Tile threads.</summary>
    public const int Tile = 16;

    /// <summary>One thread per output element; any shape, any transposition.</summary>
    public static void NaiveKernel(
        Index1D index,        // over Batch * M * N
        ArrayView<float> a,   // (Batch, M, K) or (Batch, K, M)
        ArrayView<float> b,   // (Batch|1, K, N) or (Batch|1, N, K)
        ArrayView<float> c,   // (Batch, M, N)
        MatMulShape s,
        float alpha,
        float beta)
    {
        int mn = s.M * s.N;
        int bt = index / mn;
        int r = index - bt * mn;
        int i = r / s.N;
        int j = r - i * s.N;
        float acc = 0f;
        for (int p = 0; p < s.K; p++)
        {
            acc += a[s.IndexA(bt, i, p)] * b[s.IndexB(bt, p, j)];
        }

        c[index] = beta == 0f ? alpha * acc : alpha * acc + beta * c[index];
    }

    /// <summary>
    /// Shared-memory tiled matmul. Grid (ceil(N/Tile), ceil(M/Tile), Batch), groups (Tile, Tile, 1).
    /// Edge tiles load zeros, so every M, N, K is correct (including M &lt; K, unlike ILGPU's sample).
    /// </summary>
    public static void TiledKernel(
        ArrayView<float> a,   // (Batch, M, K) or (Batch, K, M)
        ArrayView<float> b,   // (Batch|1, K, N) or (Batch|1, N, K)
        ArrayView<float> c,   // (Batch, M, N)
        MatMulShape s,
        float alpha,
        float beta)
    {
        var tileA = SharedMemory.Allocate<float>(Tile * Tile);
        var tileB = SharedMemory.Allocate<float>(Tile * Tile);
        int tx = Group.IdxX;
        int ty = Group.IdxY;
        int j = Grid.IdxX * Tile + tx;
        int i = Grid.IdxY * Tile + ty;
        int bt = Grid.IdxZ;
        float acc = 0f;
        for (int p0 = 0; p0 < s.K; p0 += Tile)
        {
            int pa = p0 + tx;
            tileA[ty * Tile + tx] = i < s.M && pa < s.K ? a[s.IndexA(bt, i, pa)] : 0f;
            int pb = p0 + ty;
            tileB[ty * Tile + tx] = pb < s.K && j < s.N ? b[s.IndexB(bt, pb, j)] : 0f;
            Group.Barrier();
            for (int q = 0; q < Tile; q++)
            {
                acc += tileA[ty * Tile + q] * tileB[q * Tile + tx];
            }

            Group.Barrier();
        }

        if (i < s.M && j < s.N)
        {
            int ci = bt * s.StrideC + i * s.N + j;
            c[ci] = beta == 0f ? alpha * acc : alpha * acc + beta * c[ci];
        }
    }
}
