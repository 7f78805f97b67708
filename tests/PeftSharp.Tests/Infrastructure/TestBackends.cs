using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Engine.Ilgpu;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>
/// The backends every op test runs on, one shared device each (ILGPU compiles each kernel once per device).
/// Absent hardware is reported as a skip with the reason, never as a pass.
/// </summary>
public static class TestBackends
{
    public const string Cpu = "cpu";
    /// <summary>ILGPU simulator, 4-thread warps, 64 warps per group.</summary>
    public const string SimWarp4 = "ilgpu-cpu-w4";
    /// <summary>ILGPU simulator, 32-thread warps, 8 warps per group, 2 multiprocessors.</summary>
    public const string SimWarp32 = "ilgpu-cpu-w32";
    public const string OpenCl = "opencl";
    public const string Cuda = "cuda";

    public static readonly string[] All = { Cpu, SimWarp4, SimWarp32, OpenCl, Cuda };

    private static readonly Dictionary<string, Lazy<(Device? Device, string? Why)>> Cache = All.ToDictionary(
        n => n, n => new Lazy<(Device?, string?)>(() => Create(n)));

    /// <summary>The shared device for a backend, or Assert.Ignore with the reason it is absent.</summary>
    public static Device Get(string name)
    {
        var (device, why) = Cache[name].Value;
        if (device == null) Assert.Ignore($"{name} not available: {why}");
        return device!;
    }

    private static (Device?, string?) Create(string name)
    {
        try
        {
            return name switch
            {
                Cpu => (new CpuDevice(), null),
                SimWarp4 => (IlgpuDevice.CreateCpuSimulator(4, 64, 1), null),
                SimWarp32 => (IlgpuDevice.CreateCpuSimulator(32, 8, 2), null),
                OpenCl => FirstOf(DeviceKind.OpenCL, "no OpenCL device (install pocl-opencl-icd; .ci/run does as root)"),
                Cuda => FirstOf(DeviceKind.Cuda, "no CUDA device"),
                _ => throw new ArgumentException(name),
            };
        }
        catch (Exception e)
        {
            return (null, $"{e.GetType().Name}: {e.Message}");
        }
    }

    private static (Device?, string?) FirstOf(DeviceKind kind, string why)
    {
        var info = Devices.List().FirstOrDefault(d => d.Kind == kind);
        if (info == null) return (null, why + (Devices.ProbeNotes.Count > 0 ? $" [{string.Join("; ", Devices.ProbeNotes)}]" : ""));
        return (Devices.Open(info.Spec), null);
    }

    internal static void DisposeAll()
    {
        foreach (var entry in Cache.Values)
        {
            if (entry.IsValueCreated) entry.Value.Device?.Dispose();
        }
    }
}

[SetUpFixture]
public sealed class AssemblyTeardown
{
    [OneTimeTearDown]
    public void DisposeDevices() => TestBackends.DisposeAll();
}
