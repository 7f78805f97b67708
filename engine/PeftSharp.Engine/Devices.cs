using ILGPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;
using PeftSharp.Engine.Cpu;
using PeftSharp.Engine.Ilgpu;

namespace PeftSharp.Engine;

/// <summary>
/// Finds and opens devices. Specs: auto | cpu | cuda[:i] | opencl[:i] | ilgpu-cpu. auto picks CUDA, then an OpenCL
/// GPU, then the CPU backend (an OpenCL CPU device such as PoCL is slower than the CPU backend, so auto skips it).
/// </summary>
public static class Devices
{
    /// <summary>The environment variable that chooses the default device.</summary>
    public const string EnvironmentVariable = "PEFTSHARP_DEVICE";

    /// <summary>Every device found: the CPU backend, CUDA and OpenCL devices, and the ILGPU simulator.</summary>
    public static IReadOnlyList<DeviceInfo> List()
    {
        ProbeNotes = Array.Empty<string>();
        var found = new List<DeviceInfo>();
        using (var cpu = new CpuDevice()) found.Add(cpu.Info);
        found.AddRange(Probe("cuda"));
        found.AddRange(Probe("opencl"));
        found.Add(new DeviceInfo("ilgpu-cpu", DeviceKind.IlgpuCpu, "ILGPU CPU accelerator", 0, 4, 256, "simulator: for checking kernels on tiny shapes only"));
        return found;
    }

    /// <summary>Why a backend found nothing (driver missing, PoCL absent...), for `peft devices`.</summary>
    public static IReadOnlyList<string> ProbeNotes { get; private set; } = Array.Empty<string>();

    /// <summary>The spec auto resolves to, among <paramref name="found"/> (probed now when not given).</summary>
    public static string AutoSpec(IReadOnlyList<DeviceInfo>? found = null)
    {
        var all = found ?? List();
        var cuda = all.FirstOrDefault(d => d.Kind == DeviceKind.Cuda);
        if (cuda != null) return cuda.Spec;
        var gpu = all.FirstOrDefault(d => d.Kind == DeviceKind.OpenCL && d.Detail.Contains("GPU", StringComparison.Ordinal));
        return gpu?.Spec ?? "cpu";
    }

    /// <summary>Opens the device named by <see cref="EnvironmentVariable"/>, or auto.</summary>
    public static Device OpenDefault() => Open(Environment.GetEnvironmentVariable(EnvironmentVariable) is { Length: > 0 } spec ? spec : "auto");

    /// <summary>Opens a device by spec; an absent device is an error that lists what is present.</summary>
    public static Device Open(string spec)
    {
        string s = spec.Trim().ToLowerInvariant();
        if (s == "auto") s = AutoSpec();
        string kind = s;
        int index = 0;
        int colon = s.IndexOf(':');
        if (colon >= 0)
        {
            kind = s[..colon];
            if (kind != "ilgpu-cpu" && !int.TryParse(s[(colon + 1)..], out index))
            {
                throw new ArgumentException($"device '{spec}': '{s[(colon + 1)..]}' is not a device index");
            }
        }

        try
        {
            return kind switch
            {
                "cpu" => new CpuDevice(),
                "ilgpu-cpu" => IlgpuDevice.CreateCpuSimulator(),
                "cuda" => IlgpuDevice.CreateCuda(index),
                "opencl" => IlgpuDevice.CreateOpenCl(index),
                _ => throw new ArgumentException($"unknown device '{spec}'; use auto, cpu, cuda[:i], opencl[:i] or ilgpu-cpu"),
            };
        }
        catch (Exception e) when (e is not ArgumentException || kind is "cuda" or "opencl")
        {
            var present = string.Join(", ", List().Select(d => d.Spec));
            throw new ArgumentException($"device '{spec}' is not available ({e.Message}); present: {present}", e);
        }
    }

    private static IEnumerable<DeviceInfo> Probe(string kind)
    {
        var result = new List<DeviceInfo>();
        try
        {
            if (kind == "opencl") OpenClSupport.InstallLibraryResolver();
            using var context = kind == "cuda" ? Context.Create(b => b.Cuda()) : Context.Create(b => b.OpenCL(OpenClSupport.AcceptAll));
            if (kind == "cuda")
            {
                int i = 0;
                foreach (var d in context.GetCudaDevices())
                {
                    result.Add(new DeviceInfo($"cuda:{i++}", DeviceKind.Cuda, d.Name, d.MemorySize, d.WarpSize, d.MaxNumThreadsPerGroup, $"CUDA, compute {d.Architecture}"));
                }
            }
            else
            {
                int i = 0;
                foreach (var d in context.GetCLDevices())
                {
                    string type = d.DeviceType == CLDeviceType.CL_DEVICE_TYPE_GPU ? "GPU" : d.DeviceType == CLDeviceType.CL_DEVICE_TYPE_CPU ? "CPU" : d.DeviceType.ToString();
                    result.Add(new DeviceInfo($"opencl:{i++}", DeviceKind.OpenCL, d.Name.Trim(), d.MemorySize, d.WarpSize, d.MaxNumThreadsPerGroup,
                        $"OpenCL {d.DeviceVersion} {type}, {d.PlatformName}"));
                }
            }
        }
        catch (Exception e)
        {
            ProbeNotes = ProbeNotes.Append($"{kind}: {e.GetType().Name}: {e.Message}").ToArray();
        }

        return result;
    }
}
