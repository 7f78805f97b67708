namespace PeftSharp.Kernels.Core;

/// <summary>Specification of row softmax over the last dimension, in double.</summary>
public static class SoftmaxReference
{
    public static void Forward(ReadOnlySpan<float> x, Span<float> y, int rows, int cols)
    {
        for (int r = 0; r < rows; r++)
        {
            var xr = x.Slice(r * cols, cols);
            double max = double.NegativeInfinity;
            foreach (float v in xr) max = Math.Max(max, v);
            double sum = 0;
            foreach (float v in xr) sum += Math.Exp(v - max);
            for (int c = 0; c < cols; c++) y[r * cols + c] = (float)(Math.Exp(xr[c] - max) / sum);
        }
    }

    /// <summary>dx = y * (dy - sum(dy * y)).</summary>
    public static void Backward(ReadOnlySpan<float> y, ReadOnlySpan<float> dy, Span<float> dx, int rows, int cols)
    {
        for (int r = 0; r < rows; r++)
        {
            double dot = 0;
            for (int c = 0; c < cols; c++) dot += (double)dy[r * cols + c] * y[r * cols + c];
            for (int c = 0; c < cols; c++) dx[r * cols + c] = (float)(y[r * cols + c] * (dy[r * cols + c] - dot));
        }
    }
}
