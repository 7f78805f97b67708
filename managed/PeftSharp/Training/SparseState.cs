using PeftSharp.Formats;

namespace PeftSharp.Training;

/// <summary>
/// A sparse fine-tune's checkpoint state (sparse_state.safetensors): each parameter's mask ("{name}.mask", Int32)
/// and, under SpIEL regrowth, the regrow state. Restored before the optimizer's moments, which follow the masks.
/// </summary>
public sealed class SparseState : ICheckpointState
{
    public const string FileName = "sparse_state.safetensors";

    private readonly MaskedAdamW optimizer;
    private readonly SparseRegrow? regrow;

    public SparseState(MaskedAdamW optimizer, SparseRegrow? regrow)
    {
        this.optimizer = optimizer;
        this.regrow = regrow;
    }

    public string File => FileName;

    public IEnumerable<SafeTensorData> Export()
    {
        foreach (var (name, mask) in optimizer.Masks) yield return SafeTensorData.Int32(name + ".mask", mask, new[] { mask.Length });
        if (regrow != null)
        {
            foreach (var t in regrow.Export()) yield return t;
        }
    }

    public void Import(SafeTensorsFile file)
    {
        var masks = ReadMasks(file, optimizer.Parameters.Select(p => p.Name));
        foreach (var p in optimizer.Parameters) optimizer.Replace(p, masks[p.Name]);
        regrow?.Import(file, masks);
    }

    /// <summary>The masks a checkpoint was trained with (to build the optimizer of a resumed run).</summary>
    public static Dictionary<string, int[]> ReadMasks(string checkpoint)
    {
        string path = System.IO.Path.Combine(checkpoint, FileName);
        if (!System.IO.File.Exists(path)) throw new PeftSharpInputException($"{checkpoint}: no {FileName}; not a sparse fine-tune's checkpoint");
        using var file = SafeTensorsFile.Open(path);
        return ReadMasks(file, file.Tensors.Select(t => t.Name).Where(n => n.EndsWith(".mask", StringComparison.Ordinal)).Select(n => n[..^5]));
    }

    private static Dictionary<string, int[]> ReadMasks(SafeTensorsFile file, IEnumerable<string> names) =>
        names.ToDictionary(n => n, n => file.Contains(n + ".mask")
            ? file.ReadInts(n + ".mask")
            : throw new PeftSharpInputException($"{file.Path}: no mask for {n}"));
}
