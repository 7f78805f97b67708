using System.Buffers.Binary;
using System.Text;
using NUnit.Framework;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;

namespace PeftSharp.Tests.Formats;

public sealed class SafeTensorsTests : TempDirectoryTest
{

    /// <summary>A file built byte by byte: length, JSON header, raw little-endian data, as the format defines it.</summary>
    private static byte[] Build(string headerJson, byte[] data)
    {
        var header = Encoding.UTF8.GetBytes(headerJson);
        var file = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)header.Length);
        header.CopyTo(file, 8);
        data.CopyTo(file, 8 + header.Length);
        return file;
    }

    private string WriteBytes(byte[] bytes)
    {
        string p = Path.Combine(TempDir, "model.safetensors");
        File.WriteAllBytes(p, bytes);
        return p;
    }

    [Test]
    public void HandWrittenFile_F32F16BF16_LoadsExactly()
    {
        var data = new List<byte>();
        foreach (float v in new[] { 1f, -2f, 0.5f, 3f, 4f, 5f }) data.AddRange(BitConverter.GetBytes(v)); // F32 [2, 3], bytes 0..24
        foreach (float v in new[] { 1.5f, -0.25f }) data.AddRange(BitConverter.GetBytes((Half)v));       // F16 [2], bytes 24..28
        data.AddRange(new byte[] { 0x80, 0x3F, 0x00, 0xC0 });                                            // BF16 [2] = 1, -2: 28..32
        string header = "{\"__metadata__\":{\"format\":\"pt\"},"
            + "\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
            + "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
            + "\"c\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[28,32]}}";
        using var f = SafeTensorsFile.Open(WriteBytes(Build(header, data.ToArray())));
        Assert.That(f.Metadata["format"], Is.EqualTo("pt"));
        Assert.That(f.Tensors.Select(t => t.Name), Is.EqualTo(new[] { "a.weight", "b", "c" }));
        Assert.That(f.ReadFloats("a.weight"), Is.EqualTo(new[] { 1f, -2f, 0.5f, 3f, 4f, 5f }));
        Assert.That(f.ReadFloats("b"), Is.EqualTo(new[] { 1.5f, -0.25f }));
        Assert.That(f.ReadFloats("c"), Is.EqualTo(new[] { 1f, -2f }));
        using var device = new CpuDevice();
        using var t = f.Load(device, "a.weight");
        Assert.That(t.Shape, Is.EqualTo(new[] { 2, 3 }));
    }

    [TestCase(StorageType.F32)]
    [TestCase(StorageType.F16)]
    [TestCase(StorageType.BF16)]
    public void WriteThenRead_RoundTripsAndPadsHeaderTo8(StorageType type)
    {
        string p = Path.Combine(TempDir, "out.safetensors");
        var values = new[] { 0f, 1f, -3f, 0.75f, 8f, -0.5f };
        SafeTensorsWriter.Write(p, new[] { new SafeTensorData("x", values, new[] { 3, 2 }, type), new SafeTensorData("empty", Array.Empty<float>(), new[] { 0, 4 }, type) },
            new Dictionary<string, string> { ["format"] = "pt" });
        var bytes = File.ReadAllBytes(p);
        Assert.That(BinaryPrimitives.ReadUInt64LittleEndian(bytes) % 8, Is.EqualTo(0UL));
        using var f = SafeTensorsFile.Open(p);
        Assert.That(f.ReadFloats("x"), Is.EqualTo(values));
        Assert.That(f["x"].DType, Is.EqualTo(type.ToString()));
        Assert.That(f.ReadFloats("empty"), Is.Empty);
        Assert.That(Directory.GetFiles(TempDir), Has.Length.EqualTo(1), "no temporary file left behind");
    }

    private static readonly object[] Corrupt =
    {
        new TestCaseData(new byte[] { 1, 2, 3 }, "shorter than the 8-byte").SetName("Open_FileShorterThan8Bytes_Rejected"),
        new TestCaseData(Build("{}", Array.Empty<byte>())[..7].Concat(new byte[] { 0 }).ToArray(), "runs past the end").SetName("Open_HeaderLengthPastEnd_Rejected"),
        new TestCaseData(HeaderLength(ulong.MaxValue), "exceeds").SetName("Open_HostileHeaderLength_Rejected"),
        new TestCaseData(Build("{not json", Array.Empty<byte>()), "not valid JSON").SetName("Open_InvalidJson_Rejected"),
        new TestCaseData(Build("[1,2]", Array.Empty<byte>()), "not a JSON object").SetName("Open_HeaderNotObject_Rejected"),
        new TestCaseData(Build("{\"w\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", new byte[4]), "unknown dtype 'F33'").SetName("Open_UnknownDtype_Rejected"),
        new TestCaseData(Build("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", new byte[4]), "needs 8 bytes").SetName("Open_SpanSizeMismatch_Rejected"),
        new TestCaseData(Build("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", new byte[8]), "truncated").SetName("Open_TruncatedData_Rejected"),
        new TestCaseData(Build("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", new byte[12]),
            "overlaps").SetName("Open_OverlappingSpans_Rejected"),
        new TestCaseData(Build("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}", Array.Empty<byte>()), "invalid dimension").SetName("Open_NegativeDimension_Rejected"),
        new TestCaseData(Build("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", new byte[8]), "invalid data_offsets").SetName("Open_ReversedOffsets_Rejected"),
    };

    private static byte[] HeaderLength(ulong n)
    {
        var b = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(b, n);
        return b;
    }

    [TestCaseSource(nameof(Corrupt))]
    public void Open_CorruptFile_ErrorNamesFileAndOffset(byte[] bytes, string expected)
    {
        string p = WriteBytes(bytes);
        var e = Assert.Throws<PeftSharpInputException>(() => SafeTensorsFile.Open(p).Dispose())!;
        Assert.That(e.Message, Does.StartWith(p + ": at byte ").And.Contain(expected));
    }

    [Test]
    public void UnsupportedDtype_LoadErrorNamesTensorAndDtype()
    {
        using var f = SafeTensorsFile.Open(WriteBytes(Build("{\"ids\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", new byte[8])));
        var e = Assert.Throws<NotSupportedException>(() => f.ReadFloats("ids"))!;
        Assert.That(e.Message, Does.Contain("'ids' is I64"));
        Assert.That(Assert.Throws<KeyNotFoundException>(() => f.ReadFloats("missing"))!.Message, Does.Contain("'missing'"));
    }

    [Test]
    public void Write_FailureLeavesExistingFileIntact()
    {
        string p = Path.Combine(TempDir, "keep.safetensors");
        SafeTensorsWriter.Write(p, new[] { new SafeTensorData("x", new[] { 1f }, new[] { 1 }) });
        var before = File.ReadAllBytes(p);
        Assert.Throws<InvalidOperationException>(() => AtomicFile.Write(p, s =>
        {
            s.Write(new byte[] { 1, 2, 3 });
            throw new InvalidOperationException("simulated crash mid-write");
        }));
        Assert.That(File.ReadAllBytes(p), Is.EqualTo(before));
        Assert.That(Directory.GetFiles(TempDir), Has.Length.EqualTo(1));
    }
}
