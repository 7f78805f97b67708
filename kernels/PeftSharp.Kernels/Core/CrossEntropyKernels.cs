using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;

namespace PeftSharp.Kernels.Core;

/// <summary>Cross-entropy from logits. Reference: <see cref="CrossEntropyReference"/>.</summary>
public static class CrossEntropyKernels
{
    /// <summary>Per-row log-sum-exp, one thread per row.</summary>
    public static void LogSumExpKernel(Index1D n, ArrayView<float> logits, ArrayView<float> lse, int vocab)
    {
        int o = n * vocab;
        float max = float.NegativeInfinity;
        for (int c = 0; c < vocab; c++) max = XMath.Max(max, logits[o + c]);
        float sum = 0f;
        for (int c = 0; c < vocab; c++) sum += XMath.Exp(logits[o + c] - max);
        lse[n] = max + XMath.Log(sum);
    }

    /// <summary>losses[n] = lse[n] - logits[n, target]; 0 where the target is the ignore index.</summary>
    public static void LossKernel(
        Index1D n, ArrayView<float> logits, ArrayView<int> targets, ArrayView<float> lse, ArrayView<float> losses, int vocab, int ignoreIndex)
    {
        int t = targets[n];
        losses[n] = t == ignoreIndex ? 0f : lse[n] - logits[n * vocab + t];
    }

    /// <summary>dlogits = scale * (softmax - onehot), one thread per element.</summary>
    public static void BackwardKernel(
        Index1D index,           // over N * V
        ArrayView<float> logits, // (N, V)
        ArrayView<int> targets,  // (N)
        ArrayView<float> lse,    // (N)
        ArrayView<float> dlogits,// (N, V)
        int vocab,
        int ignoreIndex,
        float scale)
    {
        int n = index / vocab;
        int c = index - n * vocab;
        int t = targets[n];
        dlogits[index] = t == ignoreIndex ? 0f : scale * (XMath.Exp(logits[index] - lse[n]) - (c == t ? 1f : 0f));
    }
}
