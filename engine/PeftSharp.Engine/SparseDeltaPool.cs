namespace PeftSharp.Engine;

/// <summary>
/// Many variants' sparse deltas of one linear layer in one device pool, each in CSR by output row, so one launch
/// serves a batch whose rows each pick their variant (or none) without a densified copy per variant.
/// </summary>
public sealed class SparseDeltaPool : IDisposable
{
    private SparseDeltaPool(Device device, int inFeatures, int outFeatures, IReadOnlyList<SparseDeltaData> variants)
    {
        Device = device;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        Names = variants.Select(v => v.Name).ToArray();
        var rowStart = new int[variants.Count * (outFeatures + 1)];
        var cols = new List<int>();
        var vals = new List<float>();
        for (int v = 0; v < variants.Count; v++)
        {
            // Sorted by flat index, the entries of output row r (index / K == r) are consecutive.
            var index = variants[v].Index;
            var order = Enumerable.Range(0, index.Length).OrderBy(e => index[e]).ToArray();
            int at = v * (outFeatures + 1), first = cols.Count, cursor = 0;
            for (int row = 0; row <= outFeatures; row++)
            {
                while (cursor < order.Length && index[order[cursor]] / inFeatures < row) cursor++;
                rowStart[at + row] = first + cursor;
            }

            foreach (int o in order)
            {
                cols.Add(index[o] % inFeatures);
                vals.Add(variants[v].Values[o]);
            }
        }

        Nonzeros = cols.Count;
        RowStart = device.FromIndices("sparse row starts", rowStart);
        Cols = device.FromIndices("sparse cols", cols.Count == 0 ? new[] { 0 } : cols.ToArray());
        Vals = device.FromArray("sparse values", vals.Count == 0 ? new[] { 0f } : vals.ToArray(), Math.Max(1, vals.Count));
        RowStartHost = rowStart;
    }

    public Device Device { get; }
    public int InFeatures { get; }
    public int OutFeatures { get; }
    public int Count => Names.Count;
    public IReadOnlyList<string> Names { get; }

    /// <summary>Stored entries over all variants.</summary>
    public int Nonzeros { get; }

    internal int[] RowStartHost { get; }
    internal IndexTensor RowStart { get; }
    internal IndexTensor Cols { get; }
    internal Tensor Vals { get; }

    /// <summary>Uploads the variants; every index is checked (inside [0, N K), distinct) and every offender named.</summary>
    public static SparseDeltaPool Create(Device device, int inFeatures, int outFeatures, IReadOnlyList<SparseDeltaData> variants)
    {
        long numel = (long)inFeatures * outFeatures;
        var problems = new List<string>();
        foreach (var v in variants)
        {
            if (v.Index.Length != v.Values.Length) problems.Add($"'{v.Name}' has {v.Index.Length} indices but {v.Values.Length} values");
            if (v.Index.Any(i => i < 0 || i >= numel)) problems.Add($"'{v.Name}' has indices outside [0, {numel})");
            if (v.Index.Distinct().Count() != v.Index.Length) problems.Add($"'{v.Name}' repeats an index");
        }

        if (problems.Count > 0) throw new ArgumentException($"sparse pool for a [{outFeatures}, {inFeatures}] layer: {string.Join("; ", problems)}");
        return new SparseDeltaPool(device, inFeatures, outFeatures, variants);
    }

    public void Dispose()
    {
        RowStart.Dispose();
        Cols.Dispose();
        Vals.Dispose();
    }
}
