using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Merging;

/// <summary>
/// Merging of one tensor from several fine-tunes of a base, as mergekit defines the methods. Task vectors are
/// tau_i = theta_i - theta_base. Linear: sum w_i theta_i (over sum w_i when normalised). Task arithmetic: theta_base +
/// lambda sum w_i tau_i. TIES: trim each tau_i to its top-density fraction by magnitude, elect each entry's sign as
/// the sign of sum w_i tau_i (+1 when 0), average the entries whose w_i tau_i agrees (weights normalised over them,
/// a zero sum of weights leaving the sum as it is), theta_base + lambda x that.
/// DARE: drop each entry of tau_i with probability 1 - density (seeded), then linear (task arithmetic) or TIES sign
/// consensus without trimming. Rescale (mergekit's `rescale`, on by default for DARE only): a sparsified tau_i is
/// scaled so its L1 norm is the full tau_i's, as mergekit's rescaled_masked_tensor does (sums in double, in chunks of
/// <see cref="Chunk"/> entries added in order, so both implementations get the same factor). Breadcrumbs: keep the entries of tau_i whose
/// magnitude ranks between the top gamma fraction and the top gamma + density fraction (both tails dropped), then
/// task arithmetic or TIES consensus. <see cref="MergeReference"/> is the specification (plain loops in double over
/// materialised task vectors); <see cref="Merge"/> computes the same doubles in the same order, so its result is
/// bit-identical, but multithreaded over chunks, with the trims found by a radix select instead of a sort and no task
/// vector materialised.
/// </summary>
public static partial class TaskVectorMerge
{
    /// <summary>
    /// Merges one tensor (the specification: see the class summary). <paramref name="baseValues"/> may be null only
    /// for Linear. <paramref name="seed"/> seeds DARE (callers derive it per tensor and input). Returns the merged values.
    /// </summary>
    public static float[] MergeReference(MergeMethod method, float[]? baseValues, IReadOnlyList<float[]> models, IReadOnlyList<MergeInput> inputs,
        bool normalize, float lambda, int seed, bool? rescale = null, int rowLength = 0)
    {
        bool l1 = rescale ?? DefaultRescale(method);
        int n = CheckInputs(baseValues, models, inputs);
        if (HasOwnForm(method)) throw new ArgumentException($"{method} has its own form: use TaskVectorMerge.{method}");
        var result = new float[n];
        if (method == MergeMethod.Linear)
        {
            double total = normalize ? inputs.Sum(i => (double)i.Weight) : 1;
            if (total == 0) throw new ArgumentException("linear merge: the weights sum to zero");
            for (int e = 0; e < n; e++)
            {
                double acc = 0;
                for (int m = 0; m < models.Count; m++) acc += inputs[m].Weight * (double)models[m][e];
                result[e] = (float)(acc / total);
            }

            return result;
        }

        if (baseValues == null) throw new ArgumentException($"{method} needs a base model");
        var tau = new double[models.Count][];
        for (int m = 0; m < models.Count; m++)
        {
            var t = new double[n];
            for (int e = 0; e < n; e++) t[e] = (double)models[m][e] - baseValues[e];
            var sparse = method switch
            {
                MergeMethod.Ties => KeepBand(t, 0, inputs[m].Density),
                MergeMethod.Breadcrumbs or MergeMethod.BreadcrumbsTies => KeepBand(t, inputs[m].Gamma, inputs[m].Density),
                MergeMethod.DareLinear or MergeMethod.DareTies => DareMask(t, inputs[m].Density, unchecked(seed * 31 + m)),
                MergeMethod.Della or MergeMethod.DellaLinear => DellaKeep(models[m], baseValues, inputs[m].Density, inputs[m].Epsilon, rowLength, unchecked(seed * 31 + m)) is { } k
                    ? t.Select((v, e) => k[e] ? v : 0).ToArray()
                    : t,
                _ => t,
            };
            if (l1 && !ReferenceEquals(sparse, t))
            {
                double factor = L1Factor(ChunkedSum(n, e => Math.Abs(t[e])), ChunkedSum(n, e => Math.Abs(sparse[e])));
                for (int e = 0; e < n; e++) sparse[e] *= factor;
            }

            tau[m] = sparse;
        }

        bool consensus = method is MergeMethod.Ties or MergeMethod.DareTies or MergeMethod.BreadcrumbsTies or MergeMethod.Della;
        for (int e = 0; e < n; e++)
        {
            double merged;
            if (consensus)
            {
                // mergekit's get_mask("sum") over the weighted task vectors: the majority sign is that of sum w_i tau_i
                // (+1 when it is 0), and an entry takes part when sign(w_i tau_i) agrees, so a negative weight flips it.
                double sum = 0;
                for (int m = 0; m < models.Count; m++) sum += inputs[m].Weight * tau[m][e];
                int majority = sum >= 0 ? 1 : -1;
                double acc = 0, weights = 0;
                for (int m = 0; m < models.Count; m++)
                {
                    double weighted = inputs[m].Weight * tau[m][e];
                    if (Math.Sign(weighted) == majority)
                    {
                        acc += weighted;
                        weights += inputs[m].Weight;
                    }
                }

                merged = normalize ? acc / (weights == 0 ? 1 : weights) : acc;
            }
            else
            {
                double acc = 0, weights = 0;
                for (int m = 0; m < models.Count; m++)
                {
                    acc += inputs[m].Weight * tau[m][e];
                    weights += inputs[m].Weight;
                }

                merged = normalize ? acc / (Math.Abs(weights) < 1e-8 ? 1 : weights) : acc; // mergekit's divisor guard
            }

            result[e] = (float)(baseValues[e] + lambda * merged);
        }

        return result;
    }

    /// <summary>The tensor length the inputs share; an error when there are none or they disagree.</summary>
    private static int CheckInputs(float[]? baseValues, IReadOnlyList<float[]> models, IReadOnlyList<MergeInput> inputs)
    {
        if (models.Count == 0) throw new ArgumentException("a merge needs at least one model");
        if (models.Count != inputs.Count) throw new ArgumentException($"{models.Count} models but {inputs.Count} parameter sets");
        int n = models[0].Length;
        if (models.Any(m => m.Length != n) || (baseValues != null && baseValues.Length != n)) throw new ArgumentException("merged tensors differ in size");
        return n;
    }

    private static void CheckDensity(float density)
    {
        if (density is <= 0f or > 1f) throw new ArgumentException($"density {density} must be in (0, 1]");
    }

    private static void CheckBand(float gamma, float density)
    {
        CheckDensity(density);
        if (gamma is < 0f or >= 1f) throw new ArgumentException($"gamma {gamma} must be in [0, 1)");
    }

    /// <summary>
    /// Keeps the entries whose magnitude ranks in (gamma, gamma + density] from the top (ties broken by position),
    /// zeroes the rest: gamma = 0 is TIES' trim to the top-density fraction; gamma &gt; 0 also drops the largest
    /// gamma fraction (Model Breadcrumbs).
    /// </summary>
    public static double[] KeepBand(double[] t, float gamma, float density)
    {
        CheckBand(gamma, density);
        int n = t.Length;
        var (skip, keep) = BandCounts(n, gamma, density);
        if (skip == 0 && keep >= n) return t;
        // Rank by (|t| descending, position ascending). A primitive sort orders the magnitudes; equal magnitudes can
        // only matter where a band edge cuts through them, and there they are resolved by position.
        var keys = new double[n];
        var order = new int[n];
        for (int i = 0; i < n; i++)
        {
            keys[i] = -Math.Abs(t[i]);
            order[i] = i;
        }

        Array.Sort(keys, order);
        foreach (int edge in new[] { skip, Math.Min(n, skip + keep) })
        {
            if (edge <= 0 || edge >= n || keys[edge - 1] != keys[edge]) continue;
            int lo = edge - 1, hi = edge;
            while (lo > 0 && keys[lo - 1] == keys[edge]) lo--;
            while (hi < n - 1 && keys[hi + 1] == keys[edge]) hi++;
            Array.Sort(order, lo, hi - lo + 1);
        }

        var result = new double[n];
        for (int r = skip; r < Math.Min(n, skip + keep); r++) result[order[r]] = t[order[r]];
        return result;
    }

    /// <summary>
    /// mergekit's slerp of one tensor from <paramref name="v0"/> (the base) towards <paramref name="v1"/>: the angle
    /// between the two as flat vectors (each normalised when its norm exceeds 1e-8), sin-weighted
    /// (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta) of the unnormalised tensors, or plain lerp when the
    /// directions are nearly parallel (|cos| &gt; 0.9995). In double throughout (mergekit computes in fp32).
    /// </summary>
    public static float[] Slerp(float[] v0, float[] v1, double t)
    {
        if (v0.Length != v1.Length) throw new ArgumentException("slerp: the tensors differ in size");
        double n0 = Math.Sqrt(v0.Sum(x => (double)x * x)), n1 = Math.Sqrt(v1.Sum(x => (double)x * x));
        double s0n = n0 > 1e-8 ? 1 / n0 : 1, s1n = n1 > 1e-8 ? 1 / n1 : 1;
        double dot = 0;
        for (int i = 0; i < v0.Length; i++) dot += v0[i] * s0n * (v1[i] * s1n);
        double a, b;
        if (Math.Abs(dot) > 0.9995)
        {
            (a, b) = (1 - t, t);
        }
        else
        {
            double theta = Math.Acos(dot), sin = Math.Sin(theta);
            (a, b) = (Math.Sin(theta - theta * t) / sin, Math.Sin(theta * t) / sin);
        }

        var result = new float[v0.Length];
        for (int i = 0; i < v0.Length; i++) result[i] = (float)(a * v0[i] + b * v1[i]);
        return result;
    }

    /// <summary>
    /// mergekit's model_stock of one tensor: the fine-tunes' offsets from the base, their mean pairwise cosine (each
    /// norm product at least 1e-6, each cosine clamped to [-1, 1]), t = N cos / (1 + (N - 1) cos), and
    /// t mean(w_i) + (1 - t) w_0; over the flattened tensor, or per output row of <paramref name="rowLength"/> entries
    /// with <paramref name="filterWise"/>. In double.
    /// </summary>
    public static float[] ModelStock(float[] w0, IReadOnlyList<float[]> ws, bool filterWise, int rowLength)
    {
        if (ws.Count < 2) throw new ArgumentException("model_stock needs at least two fine-tuned tensors");
        if (ws.Any(w => w.Length != w0.Length)) throw new ArgumentException("model_stock: the tensors differ in size");
        int n = w0.Length, row = filterWise ? rowLength : n, rows = n / row;
        var result = new float[n];
        for (int r = 0; r < rows; r++)
        {
            int at = r * row;
            double cosSum = 0;
            int pairs = 0;
            for (int i = 0; i < ws.Count; i++)
            {
                for (int j = i + 1; j < ws.Count; j++)
                {
                    double dot = 0, ni = 0, nj = 0;
                    for (int e = at; e < at + row; e++)
                    {
                        double a = (double)ws[i][e] - w0[e], b = (double)ws[j][e] - w0[e];
                        dot += a * b;
                        ni += a * a;
                        nj += b * b;
                    }

                    cosSum += Math.Clamp(dot / Math.Max(Math.Sqrt(ni) * Math.Sqrt(nj), 1e-6), -1, 1);
                    pairs++;
                }
            }

            double cos = cosSum / pairs, count = ws.Count, t = count * cos / (1 + (count - 1) * cos);
            for (int e = at; e < at + row; e++)
            {
                double avg = 0;
                foreach (var w in ws) avg += w[e];
                result[e] = (float)(t * (avg / count) + (1 - t) * w0[e]);
            }
        }

        return result;
    }

    /// <summary>mergekit's registry: rescale defaults to true for dare_linear and dare_ties (della too), false otherwise.</summary>
    public static bool DefaultRescale(MergeMethod method) => method is MergeMethod.DareLinear or MergeMethod.DareTies or MergeMethod.Della or MergeMethod.DellaLinear;

    /// <summary>
    /// DELLA's MagPrune as mergekit's della_magprune defines it: within each row of <paramref name="rowLength"/>
    /// entries (the tensor's last dimension; a 1-D tensor is one row), an entry of tau ranked r of n by magnitude
    /// (smallest first, ties by position) is kept with probability density - epsilon + 2 epsilon r / (n - 1), drawn
    /// from the seeded generator. Null (keep all) at density 1; the probabilities must stay inside (0, 1).
    /// </summary>
    public static bool[]? DellaKeep(float[] model, float[] baseValues, float density, float epsilon, int rowLength, int seed)
    {
        if (density >= 1f) return null;
        int n = model.Length;
        if (density <= 0f) return new bool[n];
        if (density + epsilon >= 1f || density - epsilon <= 0f) throw new ArgumentException($"della: epsilon {epsilon} must keep density {density} +- epsilon inside (0, 1)");
        int row = rowLength > 0 ? rowLength : n;
        if (n % row != 0) throw new ArgumentException($"della: {n} entries are not rows of {row}");
        var keep = new bool[n];
        var order = new int[row];
        var mags = new double[row];
        for (int r0 = 0; r0 < n; r0 += row)
        {
            for (int i = 0; i < row; i++)
            {
                order[i] = i;
                mags[i] = Math.Abs((double)model[r0 + i] - baseValues[r0 + i]);
            }

            Array.Sort(order, (a, b) => mags[a] != mags[b] ? mags[a].CompareTo(mags[b]) : a.CompareTo(b));
            for (int rank = 0; rank < row; rank++)
            {
                int e = r0 + order[rank];
                double p = density - epsilon + (row > 1 ? 2.0 * epsilon * rank / (row - 1) : epsilon);
                keep[e] = SparseKernels.Uniform(seed, e) < p;
            }
        }

        return keep;
    }

    /// <summary>rescaled_masked_tensor's L1 factor: before / after, or 1 when either is below 1e-7.</summary>
    internal static double L1Factor(double before, double after) => before < 1e-7 || after < 1e-7 ? 1 : before / after;

    /// <summary>Sum of f(0 .. n-1): in order within chunks of <see cref="Chunk"/>, the chunk sums added in order.</summary>
    internal static double ChunkedSum(int n, Func<int, double> f)
    {
        double total = 0;
        for (int c = 0; c * Chunk < n; c++)
        {
            double part = 0;
            for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++) part += f(e);
            total += part;
        }

        return total;
    }

    /// <summary>DARE's drop alone: each entry kept with probability density (seeded, the kernel's draws), none rescaled.</summary>
    public static double[] DareMask(double[] t, float density, int seed)
    {
        CheckDensity(density);
        float p = 1f - density;
        var result = new double[t.Length];
        for (int i = 0; i < t.Length; i++) result[i] = SparseKernels.Uniform(seed, i) >= p ? t[i] : 0;
        return result;
    }

    /// <summary>DARE on a task vector: drop with probability 1 - density, rescale the kept by 1 / density (seeded, as the kernel does).</summary>
    public static double[] Dare(double[] t, float density, int seed)
    {
        CheckDensity(density);
        float p = 1f - density;
        var result = new double[t.Length];
        for (int i = 0; i < t.Length; i++) result[i] = SparseKernels.Uniform(seed, i) >= p ? (p == 0f ? t[i] : t[i] / density) : 0;
        return result;
    }

    /// <summary>
    /// LiNeS-style layer scaling of a task vector: layer l of L gets alpha + (beta - alpha) l / (L - 1) (shallow
    /// layers kept near the base, deep layers full); parameters outside the layers get alpha.
    /// </summary>
    public static float LinesScale(int? layer, int layers, float alpha, float beta) =>
        layer is int l && layers > 1 ? alpha + (beta - alpha) * l / (layers - 1) : layer is not null ? beta : alpha;
}
