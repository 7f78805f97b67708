namespace PeftSharp.Training;

/// <summary>
/// The top-k singular triplets of a small dense matrix, in double: subspace iteration on G G^T from a seeded random
/// start, then an exact eigen-decomposition (Jacobi) of the k x k projection. Meant for adapter initialisation on
/// the host (LoRA-GA), where k is twice a LoRA rank and the matrices are single weight gradients.
/// </summary>
public static class Svd
{
    /// <summary>G (m, n) row-major; returns U (m, k) and V (n, k) column j for the j-th largest singular value S[j].</summary>
    public static (double[,] U, double[] S, double[,] V) Top(float[] g, int m, int n, int k, int seed = 0, int iterations = 40)
    {
        if (g.Length != m * n) throw new ArgumentException($"G has {g.Length} values, not {m} x {n}");
        k = Math.Min(k, Math.Min(m, n));
        var rng = new Random(seed);
        var q = new double[n, k];
        for (int i = 0; i < n; i++)
        {
            for (int j = 0; j < k; j++) q[i, j] = rng.NextDouble() * 2 - 1;
        }

        Orthonormalize(q, n, k);
        var z = new double[m, k];
        for (int it = 0; it < iterations; it++)
        {
            Multiply(g, m, n, q, z, transpose: false);   // Z = G Q
            Orthonormalize(z, m, k);
            Multiply(g, m, n, z, q, transpose: true);    // Q = G^T Z
            Orthonormalize(q, n, k);
        }

        Multiply(g, m, n, q, z, transpose: false);       // Z = G Q: G restricted to span(Q)
        // Z = U' S' W^T by the eigen-decomposition of Z^T Z = W S'^2 W^T; then U = Z W / S, V = Q W.
        var zz = new double[k, k];
        for (int a = 0; a < k; a++)
        {
            for (int b = 0; b < k; b++)
            {
                double acc = 0;
                for (int i = 0; i < m; i++) acc += z[i, a] * z[i, b];
                zz[a, b] = acc;
            }
        }

        var (values, vectors) = Jacobi(zz, k);
        var order = Enumerable.Range(0, k).OrderByDescending(i => values[i]).ToArray();
        var u = new double[m, k];
        var v = new double[n, k];
        var s = new double[k];
        for (int j = 0; j < k; j++)
        {
            int e = order[j];
            s[j] = Math.Sqrt(Math.Max(values[e], 0));
            for (int i = 0; i < n; i++)
            {
                double acc = 0;
                for (int a = 0; a < k; a++) acc += q[i, a] * vectors[a, e];
                v[i, j] = acc;
            }

            for (int i = 0; i < m; i++)
            {
                double acc = 0;
                for (int a = 0; a < k; a++) acc += z[i, a] * vectors[a, e];
                u[i, j] = s[j] > 1e-300 ? acc / s[j] : 0;
            }
        }

        return (u, s, v);
    }

    /// <summary>y = G x (transpose false: x (n, k), y (m, k)) or y = G^T x (x (m, k), y (n, k)).</summary>
    private static void Multiply(float[] g, int m, int n, double[,] x, double[,] y, bool transpose)
    {
        int k = x.GetLength(1);
        Array.Clear(y);
        for (int r = 0; r < m; r++)
        {
            for (int c = 0; c < n; c++)
            {
                double w = g[r * n + c];
                if (w == 0) continue;
                for (int j = 0; j < k; j++)
                {
                    if (transpose) y[c, j] += w * x[r, j];
                    else y[r, j] += w * x[c, j];
                }
            }
        }
    }

    /// <summary>
    /// Gram-Schmidt on the columns of a (rows, k), each projected twice ("twice is enough": one pass leaves a column
    /// that nearly lies in the span of the earlier ones far from orthogonal to them). A column left with less than 1e-10
    /// of its norm lies in that span (G has lower rank than k) and is replaced by the next unit vector.
    /// </summary>
    private static void Orthonormalize(double[,] a, int rows, int k)
    {
        int candidate = 0;
        for (int j = 0; j < k; j++)
        {
            double before = ColumnNorm(a, rows, j);
            for (int pass = 0; pass < 2; pass++)
            {
                for (int p = 0; p < j; p++)
                {
                    double dot = 0;
                    for (int i = 0; i < rows; i++) dot += a[i, j] * a[i, p];
                    for (int i = 0; i < rows; i++) a[i, j] -= dot * a[i, p];
                }
            }

            double norm = ColumnNorm(a, rows, j);
            if (norm <= 1e-10 * before || norm < 1e-200)
            {
                if (candidate >= rows + k) throw new InvalidOperationException($"orthonormalize: no unit vector completes {j} columns of {rows} rows");
                for (int i = 0; i < rows; i++) a[i, j] = i == candidate % rows ? 1 : 0;
                candidate++;
                j--; // orthogonalize the replacement
                continue;
            }

            for (int i = 0; i < rows; i++) a[i, j] /= norm;
        }
    }

    private static double ColumnNorm(double[,] a, int rows, int j)
    {
        double norm = 0;
        for (int i = 0; i < rows; i++) norm += a[i, j] * a[i, j];
        return Math.Sqrt(norm);
    }

    /// <summary>Cyclic Jacobi eigen-decomposition of a symmetric k x k matrix: eigenvalues and eigenvectors (columns).</summary>
    private static (double[] Values, double[,] Vectors) Jacobi(double[,] a, int k)
    {
        var v = new double[k, k];
        for (int i = 0; i < k; i++) v[i, i] = 1;
        for (int sweep = 0; sweep < 100; sweep++)
        {
            double off = 0;
            for (int p = 0; p < k; p++)
            {
                for (int q = p + 1; q < k; q++) off += a[p, q] * a[p, q];
            }

            if (off < 1e-30) break;
            for (int p = 0; p < k; p++)
            {
                for (int q = p + 1; q < k; q++)
                {
                    if (Math.Abs(a[p, q]) < 1e-300) continue;
                    double theta = (a[q, q] - a[p, p]) / (2 * a[p, q]);
                    double t = Math.Sign(theta == 0 ? 1 : theta) / (Math.Abs(theta) + Math.Sqrt(theta * theta + 1));
                    double c = 1 / Math.Sqrt(t * t + 1), s = t * c;
                    for (int r = 0; r < k; r++)
                    {
                        double arp = a[r, p], arq = a[r, q];
                        a[r, p] = c * arp - s * arq;
                        a[r, q] = s * arp + c * arq;
                    }

                    for (int r = 0; r < k; r++)
                    {
                        double apr = a[p, r], aqr = a[q, r];
                        a[p, r] = c * apr - s * aqr;
                        a[q, r] = s * apr + c * aqr;
                    }

                    for (int r = 0; r < k; r++)
                    {
                        double vrp = v[r, p], vrq = v[r, q];
                        v[r, p] = c * vrp - s * vrq;
                        v[r, q] = s * vrp + c * vrq;
                    }
                }
            }
        }

        return (Enumerable.Range(0, k).Select(i => a[i, i]).ToArray(), v);
    }
}
