namespace PeftSharp.Engine;

/// <summary>The kinds of device PeftSharp runs on.</summary>
public enum DeviceKind
{
    /// <summary>The vectorized, multithreaded C# backend: the default without a GPU.</summary>
    Cpu,
    /// <summary>ILGPU on an NVIDIA GPU.</summary>
    Cuda,
    /// <summary>ILGPU on an OpenCL device (a GPU, or the CPU through PoCL).</summary>
    OpenCL,
    /// <summary>ILGPU's CPU accelerator: a simulator for checking kernels on tiny shapes, never for speed.</summary>
    IlgpuCpu,
}
