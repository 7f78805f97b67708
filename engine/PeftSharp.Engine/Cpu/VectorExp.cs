using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// Single-precision e^x on whole vectors, for the passes that are mostly exponentials (attention's softmax, SwiGLU's
/// sigmoid). .NET's Vector512.Exp computes in double precision (about 10 ns a 16-float vector here) and Vector256.Exp
/// is not vectorised at all (4 ns an element); softmax and SwiGLU spent most of their time there. This is the usual
/// float kernel: x = n ln2 + r with |r| &lt;= ln2 / 2 (ln2 split in two so r is exact), e^r = 1 + r + r^2 P(r) with
/// Cephes' minimax P, 2^n from the exponent bits. Against Math.Exp: at most 1 ulp over 3 million random points in
/// [-87.3, 88.7] (a degree-6 Taylor polynomial reached 3 ulp) and over VectorExpTests' grid. Below -87.3 the result
/// is 0 (exp(-inf) = 0 included), above 88.7 +infinity, NaN stays NaN.
/// </summary>
internal static unsafe class VectorExp
{
    private const float Log2E = 1.44269504088896341f;
    private const float Ln2Hi = 0.693359375f;        // ln 2 to 9 bits: n * Ln2Hi is exact for |n| < 2^15
    private const float Ln2Lo = -2.12194440e-4f;     // ln 2 - Ln2Hi
    private const float Low = -87.33654f;            // e^Low is the smallest normal float
    private const float High = 88.72283f;            // e^High is the largest float
    // e^r = 1 + r + r^2 P(r) on |r| <= ln2 / 2, P the minimax polynomial of Cephes' expf (degree 5).
    private const float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f;
    private const float P3 = 4.1665795894e-2f, P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp(Vector512<float> x)
    {
        var c = Vector512.Min(Vector512.Max(x, Vector512.Create(Low)), Vector512.Create(High));
        var n = Vector512.Round(c * Vector512.Create(Log2E));
        var r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Hi), c);
        r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Lo), r);
        var p = Vector512.FusedMultiplyAdd(Vector512.Create(P0), r, Vector512.Create(P1));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P2));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P3));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P4));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P5));
        p = Vector512.FusedMultiplyAdd(p, r * r, r + Vector512<float>.One);
        // 2^n as two powers, n = n1 + n2 with both in [-63, 64]: n reaches 128 near High, past the exponent field.
        var ni = Vector512.ConvertToInt32(n);
        var n1 = Vector512.ShiftRightArithmetic(ni, 1);
        var bias = Vector512.Create(127);
        var e = p * Vector512.ShiftLeft(n1 + bias, 23).AsSingle() * Vector512.ShiftLeft(ni - n1 + bias, 23).AsSingle();
        e = Vector512.ConditionalSelect(Vector512.LessThan(x, Vector512.Create(Low)), Vector512<float>.Zero, e);
        e = Vector512.ConditionalSelect(Vector512.GreaterThan(x, Vector512.Create(High)), Vector512.Create(float.PositiveInfinity), e);
        return Vector512.ConditionalSelect(Vector512.Equals(x, x), e, x);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp(Vector256<float> x)
    {
        var c = Vector256.Min(Vector256.Max(x, Vector256.Create(Low)), Vector256.Create(High));
        var n = Vector256.Round(c * Vector256.Create(Log2E));
        var r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Hi), c);
        r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Lo), r);
        var p = Vector256.FusedMultiplyAdd(Vector256.Create(P0), r, Vector256.Create(P1));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P2));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P3));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P4));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P5));
        p = Vector256.FusedMultiplyAdd(p, r * r, r + Vector256<float>.One);
        // 2^n as two powers, n = n1 + n2 with both in [-63, 64]: n reaches 128 near High, past the exponent field.
        var ni = Vector256.ConvertToInt32(n);
        var n1 = Vector256.ShiftRightArithmetic(ni, 1);
        var bias = Vector256.Create(127);
        var e = p * Vector256.ShiftLeft(n1 + bias, 23).AsSingle() * Vector256.ShiftLeft(ni - n1 + bias, 23).AsSingle();
        e = Vector256.ConditionalSelect(Vector256.LessThan(x, Vector256.Create(Low)), Vector256<float>.Zero, e);
        e = Vector256.ConditionalSelect(Vector256.GreaterThan(x, Vector256.Create(High)), Vector256.Create(float.PositiveInfinity), e);
        return Vector256.ConditionalSelect(Vector256.Equals(x, x), e, x);
    }

    /// <summary>The scalar form of the same computation (tails, and CPUs with neither vector width).</summary>
    public static float Exp(float x) => Vector256.IsHardwareAccelerated ? Exp(Vector256.Create(x)).ToScalar() : MathF.Exp(x);

    /// <summary>The largest of row[0..n), n &gt; 0 (NaN when one is NaN, as the softmax then is).</summary>
    public static float Max(float* row, int n)
    {
        int j = 0;
        float max = float.NegativeInfinity;
        if (Vector512.IsHardwareAccelerated && n >= 16)
        {
            var v = Vector512.Load(row);
            for (j = 16; j + 16 <= n; j += 16) v = Vector512.Max(v, Vector512.Load(row + j));
            var h = Vector256.Max(v.GetLower(), v.GetUpper());
            var q = Vector128.Max(h.GetLower(), h.GetUpper());
            q = Vector128.Max(q, Vector128.Shuffle(q, Vector128.Create(2, 3, 0, 1)));
            q = Vector128.Max(q, Vector128.Shuffle(q, Vector128.Create(1, 0, 3, 2)));
            max = q.ToScalar();
        }

        for (; j < n; j++) max = MathF.Max(max, row[j]);
        return max;
    }

    /// <summary>
    /// row[j] = e^(row[j] - shift) for j &lt; n; returns their sum. Tails go through a padded vector (padding e^-inf = 0).
    /// </summary>
    public static float ExpShifted(float* row, int n, float shift)
    {
        int j = 0;
        float sum;
        if (Vector512.IsHardwareAccelerated)
        {
            var m = Vector512.Create(shift);
            var acc = Vector512<float>.Zero;
            for (; j + 16 <= n; j += 16)
            {
                var e = Exp(Vector512.Load(row + j) - m);
                e.Store(row + j);
                acc += e;
            }

            if (j < n)
            {
                var mask = Vector512.LessThan(Vector512.Create(j) + Vector512.Create(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), Vector512.Create(n));
                float* tail = stackalloc float[16];
                for (int t = j; t < n; t++) tail[t - j] = row[t];
                var e = Vector512.ConditionalSelect(mask.AsSingle(), Exp(Vector512.Load(tail) - m), Vector512<float>.Zero);
                e.Store(tail);
                acc += e;
                for (int t = j; t < n; t++) row[t] = tail[t - j];
            }

            sum = Vector512.Sum(acc);
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            var m = Vector256.Create(shift);
            var acc = Vector256<float>.Zero;
            for (; j + 8 <= n; j += 8)
            {
                var e = Exp(Vector256.Load(row + j) - m);
                e.Store(row + j);
                acc += e;
            }

            sum = Vector256.Sum(acc);
            for (; j < n; j++)
            {
                row[j] = Exp(row[j] - shift);
                sum += row[j];
            }
        }
        else
        {
            sum = 0f;
            for (; j < n; j++)
            {
                row[j] = MathF.Exp(row[j] - shift);
                sum += row[j];
            }
        }

        return sum;
    }

    /// <summary>y = 1 / (1 + e^-x), elementwise (y may be x).</summary>
    public static void Sigmoid(ReadOnlySpan<float> x, Span<float> y)
    {
        if (y.Length < x.Length) throw new ArgumentException($"sigmoid: destination holds {y.Length} of {x.Length} values");
        int n = x.Length;
        fixed (float* px = x, py = y)
        {
            int j = 0;
            if (Vector512.IsHardwareAccelerated)
            {
                for (; j + 16 <= n; j += 16) (Vector512<float>.One / (Vector512<float>.One + Exp(-Vector512.Load(px + j)))).Store(py + j);
            }

            if (Vector256.IsHardwareAccelerated)
            {
                for (; j + 8 <= n; j += 8) (Vector256<float>.One / (Vector256<float>.One + Exp(-Vector256.Load(px + j)))).Store(py + j);
            }

            for (; j < n; j++) py[j] = 1f / (1f + Exp(-px[j]));
        }
    }
}
