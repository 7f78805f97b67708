namespace PeftSharp.Tests.Infrastructure;

/// <summary>
/// Named tolerances for |actual - expected| &lt;= Atol + Rtol * |expected|, against the double-precision references.
/// Each says what error it covers; headroom is about 10x the worst error seen on the CPU backend and the simulators.
/// </summary>
public static class Tolerances
{
    /// <summary>Exact data movement (embedding lookup, copy): no arithmetic, so no error.</summary>
    public static readonly (double Atol, double Rtol) Exact = (0, 0);

    /// <summary>One or two float roundings per element (add, mul, scale, axpy, optimizer steps).</summary>
    public static readonly (double Atol, double Rtol) Elementwise = (1e-6, 1e-5);

    /// <summary>
    /// fp32 dot products of length K with inputs in [-1, 1]: the error grows like sqrt(K) * 6e-8 * |terms|; seen up to
    /// 2e-6 at K = 300 (FMA and different summation orders on each backend).
    /// </summary>
    public static (double Atol, double Rtol) Dot(int k) => (2e-6 * Math.Sqrt(Math.Max(k, 1)) + 1e-6, 1e-5);

    /// <summary>Transcendentals (exp, sigmoid, log, rsqrt, sin/cos) in fp32: a few ulps each, seen ~3e-7 relative.</summary>
    public static readonly (double Atol, double Rtol) Transcendental = (2e-6, 2e-5);

    /// <summary>
    /// Softmax-weighted sums (attention, cross-entropy): exp and running rescales plus a length-D dot per score;
    /// seen ~2e-6 on the shapes tested.
    /// </summary>
    public static readonly (double Atol, double Rtol) Attention = (2e-5, 1e-4);

    /// <summary>
    /// Rotary embedding: inv_freq and the angle pos * inv_freq are rounded to fp32 as transformers does, so the angle's
    /// error is ~pos * 6e-8 rad; positions in the tests stay below 200.
    /// </summary>
    public static readonly (double Atol, double Rtol) Rope = (3e-5, 1e-4);

    /// <summary>Finite differences of double-accumulating references whose outputs are fp32: central difference with step h ~ 1e-2.</summary>
    public static readonly (double Atol, double Rtol) FiniteDifference = (2e-3, 2e-2);
}
