using PeftSharp.Adapters;
using PeftSharp.Engine;

namespace PeftSharp.Model;

/// <summary>
/// One linear module of the model (x (rows, in) -> y (rows, out)): the shared base product y = x W^T, then each row's
/// variant delta (<see cref="IRowVariants"/>: LoRA, 1-bit or sparse deltas of a serving batch), then the module's own
/// trainable adapter (<see cref="Adapter"/>: LoRA or DoRA), then the adapters of a set-batched pass on their own rows.
/// </summary>
internal sealed class Linear
{
    private readonly List<LoraLayer?> setAdapters = new();

    public Linear(string module, int moduleIndex, Parameter weight, Parameter? bias = null)
    {
        Module = module;
        ModuleIndex = moduleIndex;
        Weight = weight;
        Bias = bias;
    }

    /// <summary>The module path (model.layers.0.self_attn.q_proj).</summary>
    public string Module { get; }

    /// <summary>Its place among the model's linear modules (seeds its dropout masks).</summary>
    public int ModuleIndex { get; }

    /// <summary>W (out, in).</summary>
    public Parameter Weight { get; }

    /// <summary>b (out), added to every row last (Qwen2's q/k/v), or null.</summary>
    public Parameter? Bias { get; }

    /// <summary>The module's own trainable adapter, or null.</summary>
    public IAdapterLayer? Adapter { get; set; }

    /// <summary>The layer of each adapter set on this module (null where that set does not target it), in set order.</summary>
    public IReadOnlyList<LoraLayer?> SetAdapters => setAdapters;

    public void AddSetAdapter(LoraLayer? layer) => setAdapters.Add(layer);

    /// <summary>True when the output is the base product alone for this pass.</summary>
    public bool IsPlain(LinearPass pass) => Adapter == null && pass.SetRows == null && pass.Variants == null && Bias == null;

    /// <summary>The bias's parameter name (model.layers.0.self_attn.q_proj.bias), also where a row's variant gives its own.</summary>
    public string BiasName => Module + ".bias";

    public void Forward(Tensor x, Tensor y, LinearPass pass)
    {
        ForwardUnbiased(x, y, pass);
        if (Bias != null || pass.Variants != null) AddBias(y, pass);
    }

    /// <summary>
    /// y += 1 b^T: the bias after the base product, the row variants and the adapters (DoRA rescales W x + B A x and
    /// leaves the bias out, as PEFT does); a row whose variant carries its own bias (a full fine-tune's 1-bit or dense
    /// delta, or a lora_bias adapter served unmerged, also on a module without a base bias) adds that one instead.
    /// </summary>
    private void AddBias(Tensor y, LinearPass pass)
    {
        int rows = y.Dim(0), outF = y.Dim(1);
        var runs = VariantRuns.Replacements(pass.Variants, BiasName, Enumerable.Range(0, rows));
        int at = 0;
        foreach (var (start, count, own) in runs.Append((rows, 0, Bias?.Value!)))
        {
            if (start > at && Bias != null) RowBroadcast.AddToRows(y.View(at * outF, start - at, outF), Bias.Value);
            if (count > 0) RowBroadcast.AddToRows(y.View(start * outF, count, outF), own);
            at = start + count;
        }
    }

    private void ForwardUnbiased(Tensor x, Tensor y, LinearPass pass)
    {
        var ops = Weight.Value.Device.Ops;
        if (Adapter is { ComputesProduct: true } own)
        {
            pass.Keep(Module, own.Forward(Weight, x, y, pass.Training, DropoutSeed(pass, 0)));
            pass.Variants?.Apply(Module, x, y);
            return;
        }

        using (var scaled = pass.Variants?.ScaleInput(Module, x)) ops.Linear(scaled ?? x, Weight.Value, y); // IA3 rows scale their input first
        pass.Variants?.Apply(Module, x, y);
        if (Adapter != null)
        {
            pass.Keep(Module, Adapter.Forward(Weight, x, y, pass.Training, DropoutSeed(pass, 0)));
            return;
        }

        if (pass.SetRows == null) return;
        int inF = x.Dim(1), outF = y.Dim(1);
        foreach (var (k, l, r0, rows) in SetSegments(pass.SetRows))
        {
            var saved = new LoraSaved();
            try
            {
                l.AddLowRank(x.View(r0 * inF, rows, inF), y.View(r0 * outF, rows, outF), pass.Training, DropoutSeed(pass, k + 1), saved);
            }
            catch
            {
                saved.Dispose();
                throw;
            }

            if (pass.Training) pass.Keep($"{Module}#{k}", saved);
            else saved.Dispose();
        }
    }

    /// <summary>dx = dL/dx (overwritten); dW and the adapters' gradients added where they train.</summary>
    public void Backward(Tensor x, Tensor dy, Tensor dx, LinearPass pass)
    {
        if (Bias is { Trainable: true }) RowBroadcast.AddColumnSums(dy, Bias.Grad); // db = dy^T 1

        if (Adapter != null)
        {
            Adapter.Backward(Weight, x, dy, dx, pass.Saved(Module));
            return;
        }

        Weight.Value.Device.Ops.LinearBackward(x, Weight.Value, dy, dx, Weight.Trainable ? Weight.Grad : null, accumulateWeight: true);
        if (pass.SetRows == null) return;
        int inF = x.Dim(1), outF = dy.Dim(1);
        foreach (var (k, l, r0, rows) in SetSegments(pass.SetRows))
        {
            l.AddLowRankBackward(x.View(r0 * inF, rows, inF), dy.View(r0 * outF, rows, outF), dx.View(r0 * inF, rows, inF), (LoraSaved)pass.Saved($"{Module}#{k}"));
        }
    }

    /// <summary>Each adapter set with a layer here, and its rows [Row0, Row0 + Rows) of the pass (sets in order, rows contiguous).</summary>
    private IEnumerable<(int Set, LoraLayer Layer, int Row0, int Rows)> SetSegments(int[] rowsPerSet)
    {
        int r0 = 0;
        for (int k = 0; k < setAdapters.Count; k++)
        {
            if (rowsPerSet[k] > 0 && setAdapters[k] is { } l) yield return (k, l, r0, rowsPerSet[k]);
            r0 += rowsPerSet[k];
        }
    }

    /// <summary>The dropout seed of this module in this pass (salt 0: its own adapter; k + 1: adapter set k).</summary>
    private int DropoutSeed(LinearPass pass, int salt) => unchecked(pass.DropoutSeed * 1_000_003 + ModuleIndex * 7919 + 17 + salt * 104_729);
}

/// <summary>
/// What one pass tells every linear module: the rows' variants (serving), the rows of each adapter set (set-batched
/// training), whether it trains (dropout on; what the backward needs is kept here) and the dropout seed.
/// </summary>
internal sealed class LinearPass : IDisposable
{
    private readonly Dictionary<string, IDisposable> saved = new();

    public LinearPass(bool training, int dropoutSeed, IRowVariants? variants = null, int[]? setRows = null)
    {
        Training = training;
        DropoutSeed = dropoutSeed;
        Variants = variants;
        SetRows = setRows;
    }

    public bool Training { get; }

    public int DropoutSeed { get; }

    public IRowVariants? Variants { get; }

    /// <summary>Rows of each adapter set, in set order, or null when the pass is not set-batched.</summary>
    public int[]? SetRows { get; }

    public void Keep(string key, IDisposable? state)
    {
        if (state != null) saved[key] = state;
    }

    public IDisposable Saved(string key) => saved.TryGetValue(key, out var s)
        ? s
        : throw new InvalidOperationException($"{key}: no saved forward state (the pass did not train)");

    public void Dispose()
    {
        foreach (var s in saved.Values) s.Dispose();
        saved.Clear();
    }
}
