using System.Numerics.Tensors;

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
        // Bases are kept as k contiguous column vectors (column j at j * length), so every dot product and update is
        // one vectorized span operation (the [row, column] arrays this used before took minutes on one 576 x 1536
        // weight at k = 298).
        var rng = new Random(seed);
        var q = new double[n * k];
        for (int i = 0; i < n; i++)
        {
            for (int j = 0; j < k; j++) q[j * n + i] = rng.NextDouble() * 2 - 1;
        }

        Orthonormalize(q, n, k);
        var z = new double[m * k];
        for (int it = 0; it < iterations; it++)
        {
            Multiply(g, m, n, q, z, k, transpose: false);   // Z = G Q
            Orthonormalize(z, m, k);
            Multiply(g, m, n, z, q, k, transpose: true);    // Q = G^T Z
            Orthonormalize(q, n, k);
        }

        Multiply(g, m, n, q, z, k, transpose: false);       // Z = G Q: G restricted to span(Q)
        // Z = U' S' W^T by the eigen-decomposition of Z^T Z = W S'^2 W^T; then U = Z W / S, V = Q W.
        var zz = new double[k, k];
        for (int a = 0; a < k; a++)
        {
            for (int b = 0; b < k; b++) zz[a, b] = TensorPrimitives.Dot(Column(z, m, a), Column(z, m, b));
        }

        var (values, vectors) = Jacobi(zz, k);
        var order = Enumerable.Range(0, k).OrderByDescending(i => values[i]).ToArray();
        var u = new double[m, k];
        var v = new double[n, k];
        var s = new double[k];
        var column = new double[Math.Max(m, n)];
        for (int j = 0; j < k; j++)
        {
            int e = order[j];
            s[j] = Math.Sqrt(Math.Max(values[e], 0));
            Combine(q, n, k, vectors, e, column);
            for (int i = 0; i < n; i++) v[i, j] = column[i];
            Combine(z, m, k, vectors, e, column);
            for (int i = 0; i < m; i++) u[i, j] = s[j] > 1e-300 ? column[i] / s[j] : 0;
        }

        return (u, s, v);
    }

    private static Span<double> Column(double[] basis, int length, int j) => basis.AsSpan(j * length, length);

    /// <summary>into[0..length) = sum_a basis column a x vectors[a, e]: a basis combination, one column of Q W or Z W.</summary>
    private static void Combine(double[] basis, int length, int k, double[,] vectors, int e, double[] into)
    {
        var target = into.AsSpan(0, length);
        target.Clear();
        for (int a = 0; a < k; a++) TensorPrimitives.MultiplyAdd(Column(basis, length, a), vectors[a, e], target, target);
    }

    /// <summary>
    /// y = G x (transpose false: x k columns of n, y k columns of m) or y = G^T x (x k columns of m, y k columns of n),
    /// each G row converted to double once and met by every column.
    /// </summary>
    private static void Multiply(float[] g, int m, int n, double[] x, double[] y, int k, bool transpose)
    {
        Array.Clear(y);
        var row = new double[n];
        for (int r = 0; r < m; r++)
        {
            for (int c = 0; c < n; c++) row[c] = g[r * n + c];
            for (int j = 0; j < k; j++)
            {
                if (transpose) TensorPrimitives.MultiplyAdd(row, x[j * m + r], Column(y, n, j), Column(y, n, j)); // y_j += x_j[r] G_r
                else y[j * m + r] = TensorPrimitives.Dot(row, Column(x, n, j));                                  // y_j[r] = G_r . x_j
            }
        }
    }

    /// <summary>
    /// Gram-Schmidt on the k columns of a (each of <paramref name="length"/>), each projected twice ("twice is enough":
    /// one pass leaves a column that nearly lies in the span of the earlier ones far from orthogonal to them). A column
    /// left with less than 1e-10 of its norm lies in that span (G has lower rank than k) and is replaced by the next
    /// unit vector.
    /// </summary>
    private static void Orthonormalize(double[] a, int length, int k)
    {
        int candidate = 0;
        for (int j = 0; j < k; j++)
        {
            var col = Column(a, length, j);
            double before = TensorPrimitives.Norm(col);
            for (int pass = 0; pass < 2; pass++)
            {
                for (int p = 0; p < j; p++)
                {
                    var earlier = Column(a, length, p);
                    TensorPrimitives.MultiplyAdd(earlier, -TensorPrimitives.Dot(col, earlier), col, col);
                }
            }

            double norm = TensorPrimitives.Norm(col);
            if (norm <= 1e-10 * before || norm < 1e-200)
            {
                if (candidate >= length + k) throw new InvalidOperationException($"orthonormalize: no unit vector completes {j} columns of {length} rows");
                col.Clear();
                col[candidate % length] = 1;
                candidate++;
                j--; // orthogonalize the replacement
                continue;
            }

            TensorPrimitives.Divide(col, norm, col);
        }
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
