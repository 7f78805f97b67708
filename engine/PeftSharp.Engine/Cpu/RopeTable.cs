using System.Runtime.Intrinsics;
using PeftSharp.Kernels.Core;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// cos and sin of every (position, frequency) angle for one rotary configuration, positions 0 .. Positions - 1, computed
/// as the per-token loop did (fp32 angle = position * inv_freq, as transformers computes it) and kept by the device:
/// a batch of sequences repeats the same positions, and every layer's q and k use the same angles. The per-token
/// loop spent most of RoPE's time in MathF.Cos and MathF.Sin (3.7 ms of the 20M model's forward; 64 calls a token).
/// </summary>
internal sealed unsafe class RopeTable
{
    /// <summary>Positions past this are not tabled for later calls (a 128K context at D = 128 would hold 64 MiB).</summary>
    private const int MaxCachedPositions = 1 << 16;

    /// <summary>Row r holds the angles of position rowPositions(r), r &lt; rows.</summary>
    private RopeTable(float theta, int dim, RopeScaling scaling, int rows, Func<int, int> rowPositions)
    {
        Theta = theta;
        Dim = dim;
        Scaling = scaling;
        Positions = rows;
        int half = dim / 2;
        var invFreq = new float[half];
        float logTheta = MathF.Log(theta);
        for (int i = 0; i < half; i++) invFreq[i] = RopeScaling.Apply(MathF.Exp(-(2f * i / dim) * logTheta), scaling);
        Cos = new float[(long)rows * half];
        Sin = new float[(long)rows * half];
        for (int r = 0; r < rows; r++)
        {
            int p = rowPositions(r);
            for (int i = 0; i < half; i++)
            {
                float angle = p * invFreq[i];
                Cos[(long)r * half + i] = MathF.Cos(angle);
                Sin[(long)r * half + i] = MathF.Sin(angle);
            }
        }
    }

    public float Theta { get; }
    public int Dim { get; }
    public RopeScaling Scaling { get; }
    /// <summary>Rows: positions 0 .. Positions - 1 of a cached table, or one per token for <see cref="ForTokens"/>.</summary>
    public int Positions { get; }
    public float[] Cos { get; }
    public float[] Sin { get; }

    /// <summary>
    /// The cached table when it matches and covers <paramref name="maxPosition"/>, else a new one (at least twice as
    /// many positions as the last, so a growing KV cache rebuilds it a logarithmic number of times) stored in
    /// <paramref name="cache"/>. Concurrent callers may each build one; any of them is correct.
    /// </summary>
    public static RopeTable For(ref RopeTable? cache, float theta, int dim, RopeScaling scaling, int maxPosition)
    {
        if (maxPosition < 0) throw new ArgumentException($"rope: position {maxPosition} is negative");
        var t = Volatile.Read(ref cache);
        bool same = t != null && t.Theta.Equals(theta) && t.Dim == dim && t.Scaling.Equals(scaling);
        if (same && maxPosition < t!.Positions) return t;
        int positions = Math.Min(Math.Max(maxPosition + 1, same ? 2 * t!.Positions : 256), MaxCachedPositions);
        var made = new RopeTable(theta, dim, scaling, positions, p => p);
        Volatile.Write(ref cache, made);
        return made;
    }

    /// <summary>
    /// True when <see cref="For"/> can table every position up to <paramref name="maxPosition"/>; past that the caller
    /// takes <see cref="ForTokens"/>, one row per token of the call, kept by nobody.
    /// </summary>
    public static bool Cacheable(int maxPosition) => maxPosition < MaxCachedPositions;

    /// <summary>A table whose row n holds the angles of positions[n], n &lt; tokens.</summary>
    public static RopeTable ForTokens(float theta, int dim, RopeScaling scaling, int[] positions, int tokens) =>
        new(theta, dim, scaling, tokens, n => positions[n]);

    /// <summary>
    /// One head: (y1, y2) = (x1 cos - x2 sin', x2 cos + x1 sin') over the two halves, sin' = sign * sin. Both halves are
    /// read before either is written, so y may be x.
    /// </summary>
    public static void Rotate(float* x, float* y, float* cos, float* sin, int half, float sign)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var sg = Vector256.Create(sign);
            for (; i + 8 <= half; i += 8)
            {
                var c = Vector256.Load(cos + i);
                var s = Vector256.Load(sin + i) * sg;
                var x1 = Vector256.Load(x + i);
                var x2 = Vector256.Load(x + half + i);
                (x1 * c - x2 * s).Store(y + i);
                (x2 * c + x1 * s).Store(y + half + i);
            }
        }

        for (; i < half; i++)
        {
            float c = cos[i], s = sign * sin[i], x1 = x[i], x2 = x[half + i];
            y[i] = x1 * c - x2 * s;
            y[half + i] = x2 * c + x1 * s;
        }
    }
}
