using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Tests.Engine;

public sealed class PrecisionTests
{
    [Test]
    public void BFloat16_RoundsToNearestEvenLikeTorch()
    {
        // 1 + 2^-8 is exactly halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1.0).
        Assert.That(Precision.ToBFloat16(1f + 1f / 256), Is.EqualTo(0x3F80));
        // Just above halfway rounds up.
        Assert.That(Precision.ToBFloat16(BitConverter.Int32BitsToSingle(0x3F808001)), Is.EqualTo(0x3F81));
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up to even.
        Assert.That(Precision.ToBFloat16(1f + 3f / 256), Is.EqualTo(0x3F82));
        Assert.That(float.IsNaN(BitConverter.Int32BitsToSingle(Precision.ToBFloat16(float.NaN) << 16)));
        Assert.That(Precision.ToBFloat16(float.NegativeInfinity), Is.EqualTo(0xFF80));
    }

    [TestCase(StorageType.F32)]
    [TestCase(StorageType.F16)]
    [TestCase(StorageType.BF16)]
    public void RoundTrip_ValuesRepresentableInTheType_AreExact(StorageType type)
    {
        // Small integers and powers of two are exact in every type.
        var values = new[] { 0f, -0f, 1f, -2f, 0.5f, 3f, 1024f, -0.125f, float.PositiveInfinity };
        var raw = new byte[values.Length * Precision.Size(type)];
        Precision.FromFloat(values, type, raw);
        using var device = new CpuDevice();
        using var t = device.FromRaw("w", raw, type, 3, 3);
        Assert.That(t.ToArray(), Is.EqualTo(values));
    }

    [Test]
    public void FromRaw_WrongByteCount_ErrorNamesTensorAndType()
    {
        using var device = new CpuDevice();
        var e = Assert.Throws<ArgumentException>(() => device.FromRaw("embed", new byte[6], StorageType.BF16, 2, 2))!;
        Assert.That(e.Message, Does.Contain("'embed' [2, 2]").And.Contain("BF16").And.Contain("needs 8 bytes, got 6"));
    }
}
