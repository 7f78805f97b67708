namespace PeftSharp.Kernels.Optim;

/// <summary>Specification of the optimizer steps, in double, with PyTorch's order of operations.</summary>
public static class OptimizerReference
{
    /// <summary>
    /// torch.optim.AdamW: p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    /// p -= lr * (m / bc1) / (sqrt(v / bc2) + eps).
    /// </summary>
    public static void AdamW(Span<float> p, ReadOnlySpan<float> g, Span<float> m, Span<float> v, AdamWStep s)
    {
        double bc1 = 1.0 - Math.Pow(s.Beta1, s.Step);
        double bc2 = 1.0 - Math.Pow(s.Beta2, s.Step);
        for (int i = 0; i < p.Length; i++)
        {
            double pi = p[i] * (1.0 - (double)s.LearningRate * s.WeightDecay);
            double mi = s.Beta1 * (double)m[i] + (1.0 - s.Beta1) * g[i];
            double vi = s.Beta2 * (double)v[i] + (1.0 - s.Beta2) * g[i] * (double)g[i];
            pi -= s.LearningRate * (mi / bc1) / (Math.Sqrt(vi / bc2) + s.Epsilon);
            p[i] = (float)pi;
            m[i] = (float)mi;
            v[i] = (float)vi;
        }
    }

    /// <summary>
    /// torch.optim.SGD with dampening 0: g += wd p; buf = momentum buf + g (buf starts at 0, which equals torch's
    /// first-step buf = g); step = nesterov ? g + momentum buf : buf; p -= lr step. Without momentum, buf is unused.
    /// </summary>
    public static void Sgd(Span<float> p, ReadOnlySpan<float> g, Span<float> buf, SgdStep s)
    {
        for (int i = 0; i < p.Length; i++)
        {
            double gi = g[i] + (double)s.WeightDecay * p[i];
            if (s.Momentum != 0f)
            {
                double bi = s.Momentum * (double)buf[i] + gi;
                buf[i] = (float)bi;
                gi = s.Nesterov ? gi + s.Momentum * bi : bi;
            }

            p[i] = (float)(p[i] - s.LearningRate * gi);
        }
    }
}
