using ILGPU;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>Embedding lookup and scatter-add backward. Reference: <see cref="EmbeddingReference"/>.</summary>
public static class EmbeddingKernels
{
    public static void ForwardKernel(
        Index1D index,         // over N * D
        ArrayView<int> ids,    // (N)
        ArrayView<float> table,// (V, D)
        ArrayView<float> y,    // (N, D)
        int dim)
    {
        int n = index / dim;
        int d = index - n * dim;
        y[index] = table[ids[n] * dim + d];
    }

    /// <summary>
    /// Scatter-add without atomics: the host groups token indices by id (a counting sort, CSR form), and one thread per
    /// (used id, d) sums its tokens in order. Deterministic, and builds on PoCL, which has no float atomics.
    /// </summary>
    public static void BackwardKernel(
        Index1D index,            // over U * D, U = number of distinct ids used
        ArrayView<int> usedIds,   // (U): the distinct ids
        ArrayView<int> offsets,   // (U + 1): tokens of usedIds[u] are order[offsets[u] .. offsets[u + 1])
        ArrayView<int> order,     // (N): token indices grouped by id
        ArrayView<float> dy,      // (N, D)
        ArrayView<float> dtable,  // (V, D), zeroed beforehand
        int dim)
    {
        int u = index / dim;
        int d = index - u * dim;
        float acc = 0f;
        for (int t = offsets[u]; t < offsets[u + 1]; t++) acc += dy[order[t] * dim + d];
        dtable[usedIds[u] * dim + d] = acc;
    }
}
