using PeftSharp.Engine;
using PeftSharp.Kernels.Optim;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// GaLore (Zhao et al., 2024): AdamW whose moments live in a rank-r projection of each 2-D weight's gradient. For W
/// (m, n) with m &lt;= n, P (m, r) holds the top-r left singular vectors of the gradient, refreshed every
/// <see cref="UpdateEvery"/> steps by randomized subspace iteration (<see cref="Svd"/>, GaLore+'s cheaper refresh); the
/// step is R = P^T G (r, n), Adam on R (moments (r, n)), and W -= lr (scale P N + wd W) with N Adam's normalised
/// update. Wider than tall: the right singular vectors, G Q. 1-D parameters and matrices no wider than r on their
/// shorter side take plain AdamW. The optimizer holds 2 r n floats (and P) per matrix instead of 2 m n.
/// With a head layout (GaLore+'s cross-head projection), an attention matrix is projected on its hidden side, and
/// the projection is refreshed from the gradient of a few heads only (ceil(r / D) of them, drawn afresh at each
/// refresh) and shared by all heads: the subspace iteration runs on a (k D, Dm) block instead of (H D, Dm).
/// </summary>
public sealed class GaLoreAdamW : Optimizer
{
    private readonly Dictionary<Parameter, State> state = new();
    private readonly Func<string, HeadLayout?>? heads;

    public GaLoreAdamW(IEnumerable<Parameter> parameters, int rank, int updateEvery = 200, float scale = 0.25f, float beta1 = 0.9f, float beta2 = 0.999f,
        float epsilon = 1e-8f, float weightDecay = 0f, int seed = 0, Func<string, HeadLayout?>? crossHead = null)
        : base(parameters)
    {
        if (rank < 1) throw new ArgumentException($"GaLore rank {rank}: must be at least 1");
        if (updateEvery < 1) throw new ArgumentException($"GaLore projection refresh every {updateEvery} steps: must be at least 1");
        (Rank, UpdateEvery, Scale, Beta1, Beta2, Epsilon, WeightDecay, Seed) = (rank, updateEvery, scale, beta1, beta2, epsilon, weightDecay, seed);
        heads = crossHead;
    }

    /// <summary>How an attention weight splits into heads: D rows (q, k, v: heads on rows) or D columns (o: heads on columns) each.</summary>
    public readonly record struct HeadLayout(int HeadDim, bool HeadsOnRows);

    /// <summary>The head layout of a Llama model's attention weights (q, k, v, o_proj), for cross-head projection.</summary>
    public static Func<string, HeadLayout?> CrossHead(LlamaConfig config) => name =>
        name.EndsWith(".self_attn.o_proj.weight", StringComparison.Ordinal) ? new HeadLayout(config.HeadDim, false)
        : name.EndsWith("_proj.weight", StringComparison.Ordinal) && name.Contains(".self_attn.", StringComparison.Ordinal) ? new HeadLayout(config.HeadDim, true)
        : null;

    /// <summary>Whether the projection multiplies from the left (P^T G, P (m, r)) rather than the right (G Q, Q (n, r)).</summary>
    private bool ProjectsLeft(Parameter p)
    {
        int m = p.Value.Dim(0), n = p.Value.Dim(1);
        return heads?.Invoke(p.Name) is { } h ? !h.HeadsOnRows : m <= n; // cross-head: the hidden side
    }

    public int Rank { get; }
    public int UpdateEvery { get; }

    /// <summary>GaLore's alpha: multiplies the projected-back update.</summary>
    public float Scale { get; }

    public float Beta1 { get; }
    public float Beta2 { get; }
    public float Epsilon { get; }
    public float WeightDecay { get; }
    public int Seed { get; }

    /// <summary>Floats the optimizer holds (moments and projections), for memory reports.</summary>
    public long StateFloats => state.Values.Sum(s => s.M.Length * 2L + (s.P?.Length ?? 0));

    /// <summary>Whether <paramref name="p"/> is stepped in a projection (a matrix wider than the rank on both sides).</summary>
    public bool Projects(Parameter p) => p.Value.Rank == 2 && Math.Min(p.Value.Dim(0), p.Value.Dim(1)) > Rank;

    public override void Step(float learningRate)
    {
        StepCount++;
        foreach (var p in Parameters)
        {
            if (!p.Trainable) continue;
            var device = p.Value.Device;
            var ops = device.Ops;
            float lr = learningRate * LearningRateScale(p.Name);
            if (!Projects(p))
            {
                var s0 = StateOf(p, p.Value.Shape.ToArray());
                ops.AdamW(p.Value, p.Grad, s0.M, s0.V, new AdamWStep(lr, Beta1, Beta2, Epsilon, WeightDecay, StepCount));
                continue;
            }

            int m = p.Value.Dim(0), n = p.Value.Dim(1);
            bool left = ProjectsLeft(p);
            var s = StateOf(p, left ? new[] { Rank, n } : new[] { m, Rank });
            if (s.P == null || (StepCount - 1) % UpdateEvery == 0) Refresh(p, s, left);
            using var r = device.Zeros(p.Name + ".galore_r", s.M.Shape.ToArray());
            if (left) ops.MatMul(s.P!, p.Grad, r, transposeA: true); // R = P^T G (r, n)
            else ops.MatMul(p.Grad, s.P!, r);                       // R = G Q (m, r)
            // Adam on R into a zeroed tensor D: D = -N (lr 1, no decay), then W = (1 - lr wd) W - lr scale (P N).
            using var d = device.Zeros(p.Name + ".galore_d", s.M.Shape.ToArray());
            ops.AdamW(d, r, s.M, s.V, new AdamWStep(1f, Beta1, Beta2, Epsilon, 0f, StepCount));
            if (WeightDecay != 0f) ops.Scale(p.Value, 1f - lr * WeightDecay, p.Value);
            if (left) ops.MatMul(s.P!, d, p.Value, alpha: lr * Scale, beta: 1f);
            else ops.MatMul(d, s.P!, p.Value, transposeB: true, alpha: lr * Scale, beta: 1f);
        }
    }

    /// <summary>P from the current gradient: its top-r left (or right) singular vectors by a few steps of seeded subspace iteration.</summary>
    private void Refresh(Parameter p, State s, bool left)
    {
        int m = p.Value.Dim(0), n = p.Value.Dim(1);
        var g = p.Grad.ToArray();
        int seed = unchecked(Seed * 31 + StepCount);
        if (heads?.Invoke(p.Name) is { } h)
        {
            // Cross-head: the block of a few heads' rows (q, k, v) or columns (o) gives the shared hidden-side basis.
            int count = (h.HeadsOnRows ? m : n) / h.HeadDim, take = Math.Min(count, (Rank + h.HeadDim - 1) / h.HeadDim);
            var chosen = Enumerable.Range(0, count).OrderBy(_ => 0).ToArray();
            new Random(seed).Shuffle(chosen);
            chosen = chosen.Take(take).Order().ToArray();
            int width = take * h.HeadDim;
            var block = h.HeadsOnRows ? new float[width * n] : new float[m * width];
            for (int k = 0; k < take; k++)
            {
                int at = chosen[k] * h.HeadDim;
                for (int d = 0; d < h.HeadDim; d++)
                {
                    if (h.HeadsOnRows) Array.Copy(g, (at + d) * n, block, (k * h.HeadDim + d) * n, n);
                    else
                    {
                        for (int i = 0; i < m; i++) block[i * width + k * h.HeadDim + d] = g[i * n + at + d];
                    }
                }
            }

            (g, m, n) = h.HeadsOnRows ? (block, width, n) : (block, m, width);
        }

        var (u, _, v) = Svd.Top(g, m, n, Rank, seed: seed, iterations: 8);
        var basis = left ? u : v;
        int rows = left ? m : n;
        var values = new float[rows * Rank];
        for (int i = 0; i < rows; i++)
        {
            for (int j = 0; j < Rank; j++) values[i * Rank + j] = (float)basis[i, j];
        }

        s.P?.Dispose();
        s.P = p.Value.Device.FromArray(p.Name + ".galore_p", values, rows, Rank);
    }

    private State StateOf(Parameter p, int[] shape)
    {
        if (!state.TryGetValue(p, out var s))
        {
            s = new State { M = p.Value.Device.Zeros(p.Name + ".exp_avg", shape), V = p.Value.Device.Zeros(p.Name + ".exp_avg_sq", shape) };
            state[p] = s;
        }

        return s;
    }

    public override IEnumerable<(string Name, float[] Values, int[] Shape)> ExportState()
    {
        foreach (var (p, s) in state)
        {
            foreach (var moment in Moments(p.Name, s.M, s.V)) yield return moment;
            if (s.P != null) yield return (p.Name + ".galore_p", s.P.ToArray(), s.P.Shape.ToArray());
        }
    }

    public override void ImportState(Func<string, float[]?> read, int stepCount)
    {
        StepCount = stepCount;
        foreach (var p in Parameters)
        {
            var (m, v) = ReadMoments(read, p.Name);
            if (m == null || v == null) continue;
            bool projected = Projects(p), left = projected && ProjectsLeft(p);
            int rows = p.Value.Dim(0), cols = p.Value.Rank == 2 ? p.Value.Dim(1) : 1;
            var shape = !projected ? p.Value.Shape.ToArray() : left ? new[] { Rank, cols } : new[] { rows, Rank };
            var s = new State { M = p.Value.Device.FromArray(p.Name + ".exp_avg", m, shape), V = p.Value.Device.FromArray(p.Name + ".exp_avg_sq", v, shape) };
            if (projected && read(p.Name + ".galore_p") is { } pv) s.P = p.Value.Device.FromArray(p.Name + ".galore_p", pv, left ? rows : cols, Rank);
            state[p] = s;
        }
    }

    public override void ResetState(IEnumerable<Parameter> reset)
    {
        foreach (var p in reset)
        {
            if (state.Remove(p, out var s)) s.Dispose();
        }
    }

    public override void Dispose()
    {
        foreach (var s in state.Values) s.Dispose();
        state.Clear();
    }

    private sealed class State : IDisposable
    {
        public Tensor M = null!, V = null!;
        public Tensor? P;

        public void Dispose()
        {
            M.Dispose();
            V.Dispose();
            P?.Dispose();
        }
    }
}
