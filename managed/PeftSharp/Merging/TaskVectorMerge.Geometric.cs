namespace PeftSharp.Merging;

/// <summary>
/// The merge methods with their own form (not weight, trim and sign election over task vectors): mergekit's nuslerp,
/// karcher and sce, each a plain loop in double over the tensor as mergekit's code defines it (mergekit computes in the
/// config's dtype, so its results differ from these in the last bits of that type).
/// </summary>
public static partial class TaskVectorMerge
{
    /// <summary>Whether <paramref name="method"/> has its own entry point instead of <see cref="Merge"/>.</summary>
    public static bool HasOwnForm(MergeMethod method) =>
        method is MergeMethod.Slerp or MergeMethod.ModelStock or MergeMethod.Passthrough or MergeMethod.Nuslerp or MergeMethod.Karcher or MergeMethod.Sce;

    /// <summary>
    /// mergekit's nuslerp: t = w1 / (w0 + w1) (0.5 when the sum is below 1e-6 in magnitude); with a base, base +
    /// slerp(t, m0 - base, m1 - base), else slerp(t, m0, m1). The slerp runs over the whole tensor as one vector
    /// (<paramref name="flatten"/>, mergekit's default), else over each row of <paramref name="rowLength"/> entries, or
    /// each column with <paramref name="rowWise"/> (mergekit's dim 0). Each vector pair: unit vectors by norms clamped
    /// to 1e-7, theta = acos of their dot clamped to [-1, 1], (sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta,
    /// or the lerp (1 - t) v0 + t v1 where |sin theta| &lt; 1e-8.
    /// </summary>
    public static float[] Nuslerp(float[]? baseValues, float[] m0, float[] m1, double w0, double w1, bool flatten, bool rowWise, int rowLength)
    {
        int n = m0.Length;
        if (m1.Length != n || (baseValues != null && baseValues.Length != n)) throw new ArgumentException("nuslerp: the tensors differ in size");
        double t = Math.Abs(w0 + w1) < 1e-6 ? 0.5 : w1 / (w0 + w1);
        var v0 = new double[n];
        var v1 = new double[n];
        for (int e = 0; e < n; e++)
        {
            double b = baseValues?[e] ?? 0;
            v0[e] = m0[e] - b;
            v1[e] = m1[e] - b;
        }

        // Vector k's entries are at offset(k) + j * stride, j < length.
        int cols = flatten || rowLength <= 0 ? n : rowLength, rows = n / cols;
        var (count, length, stride) = flatten ? (1, n, 1) : rowWise ? (cols, rows, cols) : (rows, cols, 1);
        var result = new float[n];
        for (int k = 0; k < count; k++)
        {
            int offset = flatten ? 0 : rowWise ? k : k * cols;
            double n0 = 0, n1 = 0, dot = 0;
            for (int j = 0; j < length; j++)
            {
                int e = offset + j * stride;
                n0 += v0[e] * v0[e];
                n1 += v1[e] * v1[e];
            }

            n0 = Math.Max(Math.Sqrt(n0), 1e-7);
            n1 = Math.Max(Math.Sqrt(n1), 1e-7);
            for (int j = 0; j < length; j++)
            {
                int e = offset + j * stride;
                dot += v0[e] / n0 * (v1[e] / n1);
            }

            double theta = Math.Acos(Math.Clamp(dot, -1, 1)), sin = Math.Sin(theta);
            bool colinear = Math.Abs(sin) < 1e-8;
            double a = colinear ? 1 - t : Math.Sin((1 - t) * theta) / sin, c = colinear ? t : Math.Sin(t * theta) / sin;
            for (int j = 0; j < length; j++)
            {
                int e = offset + j * stride;
                result[e] = (float)((baseValues?[e] ?? 0) + a * v0[e] + c * v1[e]);
            }
        }

        return result;
    }

    /// <summary>
    /// mergekit's karcher: the Riemannian mean on the unit sphere of the tensors' directions (equal weights 1/n),
    /// scaled by the mean of their norms. Tensors of norm at most <paramref name="tol"/> take no part in the direction;
    /// the start is the normalised weighted mean of the unit vectors (the first unit vector when that is shorter than
    /// tol); each of at most <paramref name="maxIter"/> steps moves along T = sum a_i theta_i / sin theta_i (u_i - cos
    /// theta_i u) (terms with theta_i &lt; tol left out) by |T|, stopping when |T| &lt; tol.
    /// </summary>
    public static float[] Karcher(IReadOnlyList<float[]> tensors, int maxIter, double tol)
    {
        if (tensors.Count == 1) return (float[])tensors[0].Clone();
        int n = tensors[0].Length;
        if (tensors.Any(x => x.Length != n)) throw new ArgumentException("karcher: the tensors differ in size");
        double alpha = 1.0 / tensors.Count;
        var norms = tensors.Select(x => Math.Sqrt(x.Sum(v => (double)v * v))).ToArray();
        var valid = Enumerable.Range(0, tensors.Count).Where(i => norms[i] > tol).ToList();
        if (valid.Count == 0) return new float[n];
        var units = valid.Select(i => tensors[i].Select(v => v / norms[i]).ToArray()).ToList();
        double a = 1.0 / valid.Count; // the valid tensors' alphas, renormalised: all equal
        var u = new double[n];
        foreach (var ui in units)
        {
            for (int e = 0; e < n; e++) u[e] += a * ui[e];
        }

        double Norm(double[] x) => Math.Sqrt(x.Sum(v => v * v));
        double normU = Norm(u);
        u = normU < tol ? (double[])units[0].Clone() : u.Select(v => v / normU).ToArray();
        for (int it = 0; it < maxIter; it++)
        {
            var tangent = new double[n];
            foreach (var ui in units)
            {
                double dot = 0;
                for (int e = 0; e < n; e++) dot += u[e] * ui[e];
                dot = Math.Clamp(dot, -1, 1);
                double theta = Math.Acos(dot);
                if (theta < tol) continue;
                double f = a * theta / Math.Sin(theta);
                for (int e = 0; e < n; e++) tangent[e] += f * (ui[e] - dot * u[e]);
            }

            double normT = Norm(tangent);
            if (normT < tol) break;
            double cos = Math.Cos(normT), sin = Math.Sin(normT);
            for (int e = 0; e < n; e++) u[e] = cos * u[e] + sin * (tangent[e] / normT);
            double un = Norm(u);
            if (un > tol)
            {
                for (int e = 0; e < n; e++) u[e] /= un;
            }
        }

        double scale = norms.Sum(x => alpha * x);
        return u.Select(v => (float)(scale * v)).ToArray();
    }

    /// <summary>
    /// mergekit's sce: task vectors tau_i = theta_i - base; with <paramref name="selectTopk"/> &lt; 1 only the entries
    /// whose variance over the models (population variance) ranks in the top int(selectTopk x nonzero variances) are
    /// kept (ties to the lower index); each model's weight is mean(tau_i^2) over the sum of those (1/n when that sum is
    /// below 1e-6); an entry of tau_i counts where its sign equals the majority sign of sum tau_i (+1 when 0); the
    /// merged entry is sum w_i tau_i over the counted ones divided by their sum of w_i clamped to 1e-6, added to base.
    /// </summary>
    public static float[] Sce(float[] baseValues, IReadOnlyList<float[]> models, double selectTopk)
    {
        int n = baseValues.Length, m = models.Count;
        if (m == 0) return (float[])baseValues.Clone();
        if (models.Any(x => x.Length != n)) throw new ArgumentException("sce: the tensors differ in size");
        var tau = models.Select(x => x.Select((v, e) => (double)v - baseValues[e]).ToArray()).ToArray();
        if (selectTopk < 1)
        {
            var keep = new bool[n];
            if (selectTopk > 0)
            {
                var variance = new double[n];
                for (int e = 0; e < n; e++)
                {
                    double mean = 0, sq = 0;
                    for (int i = 0; i < m; i++) mean += tau[i][e];
                    mean /= m;
                    for (int i = 0; i < m; i++) sq += (tau[i][e] - mean) * (tau[i][e] - mean);
                    variance[e] = sq / m;
                }

                int k = (int)(variance.Count(v => v != 0) * selectTopk);
                foreach (int e in Enumerable.Range(0, n).OrderByDescending(e => Math.Abs(variance[e])).ThenBy(e => e).Take(k)) keep[e] = true;
            }

            foreach (var t in tau)
            {
                for (int e = 0; e < n; e++) t[e] = keep[e] ? t[e] : 0;
            }
        }

        var w = tau.Select(t => t.Sum(v => v * v) / n).ToArray();
        double total = w.Sum();
        w = Math.Abs(total) < 1e-6 ? w.Select(_ => 1.0 / m).ToArray() : w.Select(x => x / total).ToArray();
        var result = new float[n];
        for (int e = 0; e < n; e++)
        {
            double sum = 0, acc = 0, weights = 0;
            for (int i = 0; i < m; i++) sum += tau[i][e];
            int majority = sum >= 0 ? 1 : -1;
            for (int i = 0; i < m; i++)
            {
                if (Math.Sign(tau[i][e]) != majority) continue;
                acc += w[i] * tau[i][e];
                weights += w[i];
            }

            result[e] = (float)(baseValues[e] + acc / Math.Max(weights, 1e-6));
        }

        return result;
    }
}
