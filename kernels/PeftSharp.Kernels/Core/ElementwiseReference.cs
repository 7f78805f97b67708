namespace PeftSharp.Kernels.Core;

/// <summary>Specification of the elementwise ops and activations, in double.</summary>
public static class ElementwiseReference
{
    public static void Add(ReadOnlySpan<float> a, ReadOnlySpan<float> b, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)((double)a[i] + b[i]);
    }

    public static void Mul(ReadOnlySpan<float> a, ReadOnlySpan<float> b, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)((double)a[i] * b[i]);
    }

    /// <summary>y[r, j] = x[r, j] * c[j] for x, y (rows, cols) and c (cols).</summary>
    public static void ScaleColumns(ReadOnlySpan<float> x, ReadOnlySpan<float> c, Span<float> y)
    {
        for (int i = 0; i < x.Length; i++) y[i] = (float)((double)x[i] * c[i % c.Length]);
    }

    public static void Scale(ReadOnlySpan<float> x, float s, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)((double)x[i] * s);
    }

    /// <summary>y += alpha * x.</summary>
    public static void AbsAdd(ReadOnlySpan<float> x, Span<float> acc)
    {
        for (int i = 0; i < acc.Length; i++) acc[i] = (float)(acc[i] + Math.Abs((double)x[i]));
    }

    public static void Axpy(float alpha, ReadOnlySpan<float> x, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)(y[i] + (double)alpha * x[i]);
    }

    public static double Sigmoid(double x) => 1.0 / (1.0 + Math.Exp(-x));

    public static double Silu(double x) => x * Sigmoid(x);

    /// <summary>d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))).</summary>
    public static double SiluDerivative(double x)
    {
        double s = Sigmoid(x);
        return s * (1 + x * (1 - s));
    }

    public static void Tanh(ReadOnlySpan<float> x, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)Math.Tanh(x[i]);
    }

    public static void TanhBackward(ReadOnlySpan<float> y, ReadOnlySpan<float> dy, Span<float> dx)
    {
        for (int i = 0; i < dx.Length; i++) dx[i] = (float)(dy[i] * (1.0 - (double)y[i] * y[i]));
    }

    public static void Silu(ReadOnlySpan<float> x, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)Silu(x[i]);
    }

    public static void SiluBackward(ReadOnlySpan<float> x, ReadOnlySpan<float> dy, Span<float> dx)
    {
        for (int i = 0; i < dx.Length; i++) dx[i] = (float)(dy[i] * SiluDerivative(x[i]));
    }

    /// <summary>SwiGLU: y = silu(gate) * up.</summary>
    public static void SwiGlu(ReadOnlySpan<float> gate, ReadOnlySpan<float> up, Span<float> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] = (float)(Silu(gate[i]) * up[i]);
    }

    public static void SwiGluBackward(
        ReadOnlySpan<float> gate, ReadOnlySpan<float> up, ReadOnlySpan<float> dy, Span<float> dGate, Span<float> dUp)
    {
        for (int i = 0; i < dy.Length; i++)
        {
            dGate[i] = (float)(dy[i] * up[i] * SiluDerivative(gate[i]));
            dUp[i] = (float)(dy[i] * Silu(gate[i]));
        }
    }

    public static double Sum(ReadOnlySpan<float> x)
    {
        double acc = 0;
        foreach (float v in x) acc += v;
        return acc;
    }

    public static double SumSquares(ReadOnlySpan<float> x)
    {
        double acc = 0;
        foreach (float v in x) acc += (double)v * v;
        return acc;
    }
}
