using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Merging;

public static partial class TaskVectorMerge
{
    private const int Chunk = 1 << 14;

    /// <summary>Every core: the merges are host-side loops over tensors' values, no backend's.</summary>
    private static readonly ParallelOptions Parallelism = new() { MaxDegreeOfParallelism = Environment.ProcessorCount };

    /// <summary>
    /// Merges one tensor: the result of <see cref="MergeReference"/>, bit for bit, computed in parallel chunks. Each
    /// input's trim (TIES, Breadcrumbs) is a band of ranks of |tau| found by <see cref="MagnitudeBand"/>; DARE's draws
    /// are the counter-based ones, made per element where they are used.
    /// </summary>
    public static float[] Merge(MergeMethod method, float[]? baseValues, IReadOnlyList<float[]> models, IReadOnlyList<MergeInput> inputs,
        bool normalize, float lambda, int seed, bool? rescale = null, int rowLength = 0)
    {
        bool l1 = rescale ?? DefaultRescale(method);
        int n = CheckInputs(baseValues, models, inputs);
        if (HasOwnForm(method)) throw new ArgumentException($"{method} has its own form: use TaskVectorMerge.{method}");
        var result = new float[n];
        int count = models.Count;
        var ms = models.ToArray();                                   // arrays, not interface calls, in the loops
        var wt = inputs.Select(i => (double)i.Weight).ToArray();     // the same doubles the reference's float * double makes
        int chunks = (n + Chunk - 1) / Chunk;
        if (method == MergeMethod.Linear)
        {
            double total = normalize ? inputs.Sum(i => (double)i.Weight) : 1;
            if (total == 0) throw new ArgumentException("linear merge: the weights sum to zero");
            Parallel.For(0, chunks, Parallelism, c =>
            {
                for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++)
                {
                    double acc = 0;
                    for (int m = 0; m < count; m++) acc += wt[m] * ms[m][e];
                    result[e] = (float)(acc / total);
                }
            });
            return result;
        }

        if (baseValues == null) throw new ArgumentException($"{method} needs a base model");
        var b = baseValues;

        // Per input: which entries its task vector keeps (null = all), and DARE's drop probability and seed.
        var keep = new bool[]?[count];
        for (int m = 0; m < count; m++)
        {
            var input = inputs[m];
            if (method is MergeMethod.DareLinear or MergeMethod.DareTies) CheckDensity(input.Density);
            keep[m] = method switch
            {
                MergeMethod.Ties => MagnitudeBand(models[m], b, 0f, input.Density),
                MergeMethod.Breadcrumbs or MergeMethod.BreadcrumbsTies => MagnitudeBand(models[m], b, input.Gamma, input.Density),
                MergeMethod.Della or MergeMethod.DellaLinear => DellaKeep(models[m], b, input.Density, input.Epsilon, rowLength, unchecked(seed * 31 + m)),
                _ => null,
            };
        }

        bool dare = method is MergeMethod.DareLinear or MergeMethod.DareTies;
        var densities = inputs.Select(i => i.Density).ToArray();
        bool consensus = method is MergeMethod.Ties or MergeMethod.DareTies or MergeMethod.BreadcrumbsTies or MergeMethod.Della;
        // The sparsified tau_i (before any rescale): its entry e, or 0 where the trim or DARE's draw dropped it.
        double Sparse(int m, int e)
        {
            double t = (double)ms[m][e] - b[e];
            if (keep[m] is { } k && !k[e]) return 0;
            if (dare && SparseKernels.Uniform(unchecked(seed * 31 + m), e) < 1f - densities[m]) return 0;
            return t;
        }

        var factor = Enumerable.Repeat(1.0, count).ToArray();
        if (l1 && (dare || keep.Any(k => k != null)))
        {
            // rescale: each input's L1 norms, full and sparsified, summed chunk by chunk as the reference sums them.
            var parts = new double[chunks, count, 2];
            Parallel.For(0, chunks, Parallelism, c =>
            {
                for (int m = 0; m < count; m++)
                {
                    if (!dare && keep[m] == null) continue;
                    double full = 0, kept = 0;
                    for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++)
                    {
                        full += Math.Abs((double)ms[m][e] - b[e]);
                        kept += Math.Abs(Sparse(m, e));
                    }

                    parts[c, m, 0] = full;
                    parts[c, m, 1] = kept;
                }
            });
            for (int m = 0; m < count; m++)
            {
                if (!dare && keep[m] == null) continue;
                double full = 0, kept = 0;
                for (int c = 0; c < chunks; c++)
                {
                    full += parts[c, m, 0];
                    kept += parts[c, m, 1];
                }

                factor[m] = L1Factor(full, kept);
            }
        }

        Parallel.For(0, chunks, Parallelism, () => new double[count], (c, _, tau) =>
        {
            for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++)
            {
                for (int m = 0; m < count; m++) tau[m] = Sparse(m, e) * factor[m];

                double merged;
                if (consensus)
                {
                    double sum = 0;
                    for (int m = 0; m < count; m++) sum += wt[m] * tau[m];
                    int majority = sum >= 0 ? 1 : -1;
                    double acc = 0, weights = 0;
                    for (int m = 0; m < count; m++)
                    {
                        double weighted = wt[m] * tau[m];
                        if (Math.Sign(weighted) == majority)
                        {
                            acc += weighted;
                            weights += wt[m];
                        }
                    }

                    merged = normalize ? acc / (weights == 0 ? 1 : weights) : acc;
                }
                else
                {
                    double acc = 0, weights = 0;
                    for (int m = 0; m < count; m++)
                    {
                        acc += wt[m] * tau[m];
                        weights += wt[m];
                    }

                    merged = normalize ? acc / (Math.Abs(weights) < 1e-8 ? 1 : weights) : acc;
                }

                result[e] = (float)(b[e] + lambda * merged);
            }

            return tau;
        }, _ => { });
        return result;
    }

    /// <summary>
    /// <see cref="KeepBand"/>'s choice for tau = model - base as a flag per entry: ranks by |tau| (double, largest
    /// first, ties by position) in the band. The rank boundaries' keys come from a radix select on the bits of |tau|
    /// (8 passes of 8 bits, each a parallel histogram); the entries equal to a boundary key are taken in position order
    /// with per-chunk counts.
    /// </summary>
    public static bool[] MagnitudeBand(float[] model, float[] baseValues, float gamma, float density)
    {
        CheckBand(gamma, density);
        int n = model.Length;
        var (skip, keepCount) = BandCounts(n, gamma, density);
        var flags = new bool[n];
        if (skip == 0 && keepCount >= n)
        {
            Array.Fill(flags, true);
            return flags;
        }

        int hi = Math.Min(n, skip + keepCount);
        if (hi <= skip) return flags;
        var keys = new ulong[n];
        int chunks = (n + Chunk - 1) / Chunk;
        Parallel.For(0, chunks, Parallelism, c =>
        {
            for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++) keys[e] = (ulong)BitConverter.DoubleToInt64Bits(Math.Abs((double)model[e] - baseValues[e]));
        });
        var (keyLo, aboveLo, keyHi, aboveHi) = KeysAtRanks(keys, skip, hi - 1);
        int loStart = skip - aboveLo, hiEnd = hi - aboveHi;
        var eqLo = new int[chunks];
        var eqHi = new int[chunks];
        Parallel.For(0, chunks, Parallelism, c =>
        {
            for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++)
            {
                if (keys[e] == keyLo) eqLo[c]++;
                if (keys[e] == keyHi) eqHi[c]++;
            }
        });
        var beforeLo = new int[chunks];
        var beforeHi = new int[chunks];
        for (int c = 1; c < chunks; c++)
        {
            beforeLo[c] = beforeLo[c - 1] + eqLo[c - 1];
            beforeHi[c] = beforeHi[c - 1] + eqHi[c - 1];
        }

        Parallel.For(0, chunks, Parallelism, c =>
        {
            int posLo = beforeLo[c], posHi = beforeHi[c];
            for (int e = c * Chunk, end = Math.Min(n, e + Chunk); e < end; e++)
            {
                ulong key = keys[e];
                bool k = key > keyHi && key < keyLo;
                if (key == keyLo || key == keyHi)
                {
                    k = true;
                    if (key == keyLo) k = posLo++ >= loStart;
                    if (key == keyHi) k = k && posHi++ < hiEnd;
                }

                flags[e] = k;
            }
        });
        return flags;
    }

    /// <summary>mergekit's counts: TIES keeps int(density n) largest; Breadcrumbs drops int(gamma n) largest and int((1 - density - gamma) n) smallest.</summary>
    private static (int Skip, int Keep) BandCounts(int n, float gamma, float density)
    {
        if (density >= 1f) return (0, n); // mergekit returns the tensor unchanged at density 1, gamma or not
        // In double from the decimal value (the YAML's number): 0.3f * 10 would be 3.0000001 in float, floored the same,
        // but (1f - 0.5f - 0.1f) * 10 is 3.9999998 in float, which would keep one entry too many.
        double d = (double)(decimal)density, g = (double)(decimal)gamma;
        int target = (int)Math.Floor(d * n + 1e-9);
        if (gamma == 0f) return (0, target);
        // magnitude_outliers: drop int(gamma n) largest and the rest of the smallest; when the two overlap (gamma +
        // density > 1), fewer of the largest are dropped so int(density n) stay.
        int top = (int)Math.Floor(g * n + 1e-9), bottom = n - target - top;
        if (bottom < 0)
        {
            top += bottom;
            bottom = 0;
        }

        return (top, n - bottom - top);
    }

    /// <summary>
    /// The keys at two ranks (0 = largest) and how many keys are larger than each. One pass histograms the top 16 bits
    /// (sign, exponent and 4 mantissa bits of |tau|, where task vectors' magnitudes separate), the keys under each
    /// rank's 16-bit prefix are copied out (a few percent of them), and 8-bit radix passes finish on those copies.
    /// </summary>
    private static (ulong KeyA, int AboveA, ulong KeyB, int AboveB) KeysAtRanks(ulong[] keys, int rankA, int rankB)
    {
        const int TopBits = 16;
        int chunks = (keys.Length + Chunk - 1) / Chunk;
        var top = new int[1 << TopBits];
        Parallel.For(0, chunks, Parallelism, () => new int[1 << TopBits], (c, _, hist) =>
        {
            for (int e = c * Chunk, end = Math.Min(keys.Length, e + Chunk); e < end; e++) hist[(int)(keys[e] >> (64 - TopBits))]++;
            return hist;
        }, hist =>
        {
            lock (top)
            {
                for (int d = 0; d < top.Length; d++) top[d] += hist[d];
            }
        });
        int aboveA = 0, aboveB = 0;
        ulong prefixA = (ulong)Digit(top, rankA, ref aboveA), prefixB = (ulong)Digit(top, rankB, ref aboveB);
        var candA = keys.Where(k => k >> (64 - TopBits) == prefixA).ToArray();
        var candB = prefixB == prefixA ? candA : keys.Where(k => k >> (64 - TopBits) == prefixB).ToArray();
        ulong keyA = Refine(candA, prefixA << (64 - TopBits), rankA, ref aboveA);
        ulong keyB = Refine(candB, prefixB << (64 - TopBits), rankB, ref aboveB);
        return (keyA, aboveA, keyB, aboveB);
    }

    /// <summary>The remaining 48 bits of the key at <paramref name="rank"/> among <paramref name="keys"/> (all sharing the top 16), 8 bits a pass.</summary>
    private static ulong Refine(ulong[] keys, ulong prefix, int rank, ref int above)
    {
        ulong mask = 0xFFFFUL << 48;
        for (int shift = 40; shift >= 0; shift -= 8)
        {
            var hist = new int[256];
            foreach (ulong k in keys)
            {
                if ((k & mask) == prefix) hist[(int)((k >> shift) & 0xFF)]++;
            }

            prefix |= (ulong)Digit(hist, rank, ref above) << shift;
            mask |= 0xFFUL << shift;
        }

        return prefix;
    }

    /// <summary>The digit whose bin holds <paramref name="rank"/>, counting from the largest digit; adds the larger bins to <paramref name="above"/>.</summary>
    private static int Digit(int[] hist, int rank, ref int above)
    {
        for (int d = hist.Length - 1; d >= 0; d--)
        {
            if (above + hist[d] > rank) return d;
            above += hist[d];
        }

        return 0;
    }
}
