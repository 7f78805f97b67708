using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Text.Json;
using PeftSharp.Engine;

namespace PeftSharp.Formats;

/// <summary>
/// A safetensors file opened read-only and memory-mapped: 8-byte little-endian header length N, N bytes of JSON
/// header, then the data. Everything is validated before any tensor is read: N fits the file, the JSON is an object,
/// every dtype is known, every span lies inside the data section, spans do not overlap, and each span's length is
/// prod(shape) x sizeof(dtype). Errors name the file and the byte offset.
/// </summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    /// <summary>Headers larger than this are refused as hostile (the format's reference reader uses 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private static readonly Dictionary<string, int> DTypeSizes = new()
    {
        ["F64"] = 8, ["F32"] = 4, ["F16"] = 2, ["BF16"] = 2, ["I64"] = 8, ["I32"] = 4, ["I16"] = 2, ["I8"] = 1,
        ["U64"] = 8, ["U32"] = 4, ["U16"] = 2, ["U8"] = 1, ["BOOL"] = 1, ["F8_E4M3"] = 1, ["F8_E5M2"] = 1,
    };

    private readonly MemoryMappedFile? map;
    private readonly MemoryMappedViewAccessor? view;
    private readonly byte* basePointer;
    private readonly long dataStart;
    private readonly Dictionary<string, SafeTensorEntry> byName;

    private SafeTensorsFile(string path, MemoryMappedFile? map, MemoryMappedViewAccessor? view, byte* basePointer, long dataStart,
        List<SafeTensorEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path;
        this.map = map;
        this.view = view;
        this.basePointer = basePointer;
        this.dataStart = dataStart;
        Tensors = entries;
        Metadata = metadata;
        byName = entries.ToDictionary(e => e.Name);
    }

    public string Path { get; }

    /// <summary>Entries in file order (by data offset).</summary>
    public IReadOnlyList<SafeTensorEntry> Tensors { get; }

    /// <summary>The optional <c>__metadata__</c> string map.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public bool Contains(string name) => byName.ContainsKey(name);

    public SafeTensorEntry this[string name] => byName.TryGetValue(name, out var e)
        ? e
        : throw new KeyNotFoundException($"{Path}: no tensor named '{name}' (the file has {Tensors.Count}: " +
            $"{string.Join(", ", Tensors.Take(5).Select(t => t.Name))}{(Tensors.Count > 5 ? ", ..." : "")})");

    public static SafeTensorsFile Open(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists) throw new FileNotFoundException($"{path}: file not found", path);
        long length = info.Length;
        if (length < 8) throw Bad(path, 0, $"file is {length} bytes, shorter than the 8-byte header length");
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        byte* p = null;
        try
        {
            map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            p += view.PointerOffset;
            var bytes = new ReadOnlySpan<byte>(p, (int)Math.Min(length, int.MaxValue));
            ulong n = BinaryPrimitives.ReadUInt64LittleEndian(bytes[..8]);
            if (n > (ulong)MaxHeaderBytes) throw Bad(path, 0, $"header length {n} exceeds the {MaxHeaderBytes}-byte limit");
            if ((long)n > length - 8) throw Bad(path, 0, $"header length {n} runs past the end of the file ({length} bytes): truncated?");
            long dataStart = 8 + (long)n;
            List<SafeTensorEntry> entries;
            Dictionary<string, string> metadata;
            try
            {
                (entries, metadata) = ParseHeader(path, bytes.Slice(8, (int)n), length - dataStart, dataStart);
            }
            catch (InvalidOperationException e)
            {
                throw Bad(path, 8, $"the header holds a string that is not valid UTF-8 ({e.Message})");
            }

            return new SafeTensorsFile(path, map, view, p, dataStart, entries, metadata);
        }
        catch
        {
            if (p != null) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map?.Dispose();
            throw;
        }
    }

    private static (List<SafeTensorEntry>, Dictionary<string, string>) ParseHeader(string path, ReadOnlySpan<byte> header, long dataLength, long dataStart)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(header.ToArray());
        }
        catch (JsonException e)
        {
            throw Bad(path, 8 + (e.BytePositionInLine ?? 0), $"header is not valid JSON: {e.Message}");
        }

        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw Bad(path, 8, "header is not a JSON object");
            var entries = new List<SafeTensorEntry>();
            var metadata = new Dictionary<string, string>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var prop in doc.RootElement.EnumerateObject())
            {
                if (!IsValidName(prop)) throw Bad(path, 8, "a tensor name is not valid UTF-8");
                if (!seen.Add(prop.Name)) throw Bad(path, 8, $"the header names '{prop.Name}' twice");
                if (prop.Name == "__metadata__")
                {
                    if (prop.Value.ValueKind != JsonValueKind.Object) throw Bad(path, 8, "__metadata__ is not an object");
                    foreach (var m in prop.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String) throw Bad(path, 8, $"__metadata__ value '{m.Name}' is not a string");
                        metadata[m.Name] = m.Value.GetString()!;
                    }

                    continue;
                }

                entries.Add(ParseEntry(path, prop, dataLength));
            }

            entries.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            for (int i = 1; i < entries.Count; i++)
            {
                if (entries[i].Begin < entries[i - 1].End)
                {
                    throw Bad(path, dataStart + entries[i].Begin,
                        $"tensor '{entries[i].Name}' overlaps '{entries[i - 1].Name}' (bytes {entries[i].Begin}..{entries[i].End} vs {entries[i - 1].Begin}..{entries[i - 1].End} of the data)");
                }
            }

            return (entries, metadata);
        }
    }

    private static bool IsValidName(JsonProperty prop)
    {
        try
        {
            _ = prop.Name;
            return true;
        }
        catch (InvalidOperationException)
        {
            return false;
        }
    }

    private static SafeTensorEntry ParseEntry(string path, JsonProperty prop, long dataLength)
    {
        var v = prop.Value;
        string name = prop.Name;
        if (v.ValueKind != JsonValueKind.Object) throw Bad(path, 8, $"entry '{name}' is not an object");
        if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String) throw Bad(path, 8, $"tensor '{name}' has no dtype string");
        string dtype = dt.GetString()!;
        if (!DTypeSizes.TryGetValue(dtype, out int size)) throw Bad(path, 8, $"tensor '{name}' has unknown dtype '{dtype}'");
        if (!v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array) throw Bad(path, 8, $"tensor '{name}' has no shape array");
        var shape = new List<long>();
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long dim) || dim < 0) throw Bad(path, 8, $"tensor '{name}' has an invalid dimension {d} in its shape");
            shape.Add(dim);
        }

        if (!v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
        {
            throw Bad(path, 8, $"tensor '{name}' needs data_offsets [begin, end]");
        }

        if (!off[0].TryGetInt64(out long begin) || !off[1].TryGetInt64(out long end) || begin < 0 || end < begin)
        {
            throw Bad(path, 8, $"tensor '{name}' has invalid data_offsets {off}");
        }

        if (end > dataLength)
        {
            throw Bad(path, 8, $"tensor '{name}' spans bytes {begin}..{end} of the data but the data section holds {dataLength} bytes: truncated?");
        }

        // Checked: [2^62, 4] overflows the element count, and [2^62] F32 would wrap to 0 bytes and match an empty span.
        long elements = 1, bytes;
        try
        {
            foreach (long d in shape) elements = checked(elements * d);
            bytes = checked(elements * size);
        }
        catch (OverflowException)
        {
            throw Bad(path, 8, $"tensor '{name}' {dtype} [{string.Join(", ", shape)}] has more elements than a 64-bit count holds");
        }

        if (end - begin != bytes)
        {
            throw Bad(path, 8, $"tensor '{name}' {dtype} [{string.Join(", ", shape)}] needs {bytes} bytes but data_offsets give {end - begin}");
        }

        return new SafeTensorEntry(name, dtype, shape.ToArray(), begin, end);
    }

    private static PeftSharpInputException Bad(string path, long offset, string message) => new($"{path}: at byte {offset}: {message}");

    /// <summary>The raw bytes of a tensor, straight from the mapping.</summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        var e = this[name];
        ObjectDisposedException.ThrowIf(view == null, this);
        return new ReadOnlySpan<byte>(basePointer + dataStart + e.Begin, checked((int)(e.End - e.Begin)));
    }

    /// <summary>The tensor as fp32 (F32, F16 and BF16 are supported; other dtypes are an error naming them).</summary>
    public float[] ReadFloats(string name)
    {
        var e = this[name];
        var values = new float[e.Elements];
        Precision.ToFloat(GetBytes(name), StorageTypeOf(e), values);
        return values;
    }

    /// <summary>The tensor as fp32 into <paramref name="destination"/> (of its element count), converted from F32, F16 or BF16.</summary>
    public void ReadFloats(string name, Span<float> destination)
    {
        var e = this[name];
        if (destination.Length != e.Elements) throw new ArgumentException($"{Path}: tensor {name} has {e.Elements} elements, not the {destination.Length} asked for");
        Precision.ToFloat(GetBytes(name), StorageTypeOf(e), destination);
    }

    /// <summary>
    /// The tensor as fp32 when the file holds it with exactly <paramref name="shape"/>; otherwise null, with what is
    /// wrong (missing, naming <paramref name="why"/> it was looked for, or its shape) added to <paramref name="problems"/>,
    /// so a reader names every problem of a file in one error.
    /// </summary>
    public float[]? ReadFloats(string name, IReadOnlyList<long> shape, List<string> problems, string? why = null)
    {
        string expected = $"[{string.Join(", ", shape)}]";
        if (!Contains(name)) problems.Add($"missing {name} {expected}{(why != null ? $" ({why})" : "")}");
        else if (!this[name].Shape.SequenceEqual(shape)) problems.Add($"{name} is {this[name].ShapeText}, expected {expected}");
        else return ReadFloats(name);
        return null;
    }

    /// <summary>An I32 tensor's values (packed bit words, indices); any other dtype is an error naming it.</summary>
    public int[] ReadInts(string name)
    {
        var e = this[name];
        if (e.DType != "I32") throw new PeftSharpInputException($"{Path}: tensor '{name}' is {e.DType}, expected I32");
        var raw = GetBytes(name);
        var values = new int[e.Elements];
        for (int i = 0; i < values.Length; i++) values[i] = BinaryPrimitives.ReadInt32LittleEndian(raw.Slice(4 * i));
        return values;
    }

    /// <summary>Loads a tensor onto a device as fp32.</summary>
    public Tensor Load(Device device, string name)
    {
        var e = this[name];
        return device.FromRaw(name, GetBytes(name), StorageTypeOf(e), e.Shape.Select(d => checked((int)d)).ToArray());
    }

    private StorageType StorageTypeOf(SafeTensorEntry e) => e.DType switch
    {
        "F32" => StorageType.F32,
        "F16" => StorageType.F16,
        "BF16" => StorageType.BF16,
        _ => throw new NotSupportedException($"{Path}: tensor '{e.Name}' is {e.DType}; PeftSharp loads F32, F16 and BF16 tensors as fp32"),
    };

    public void Dispose()
    {
        if (view == null) return;
        view.SafeMemoryMappedViewHandle.ReleasePointer();
        view.Dispose();
        map!.Dispose();
    }
}
