using System.Reflection;
using System.Runtime.InteropServices;
using ILGPU.Runtime.OpenCL;

namespace PeftSharp.Engine.Ilgpu;

/// <summary>
/// Two workarounds that make ILGPU 1.5.3's OpenCL backend usable on common Linux installs, PoCL in particular.
/// </summary>
internal static class OpenClSupport
{
    private static int resolverInstalled;

    /// <summary>Device filter that keeps every OpenCL device (ILGPU's default filter drops PoCL).</summary>
    public static bool AcceptAll(CLDevice device) => true;

    /// <summary>
    /// ILGPU binds to the unversioned "libOpenCL.so", which only the -dev package (ocl-icd-opencl-dev) installs;
    /// the runtime package ships libOpenCL.so.1. Map the name to the versioned library when the plain one is absent.
    /// </summary>
    public static void InstallLibraryResolver()
    {
        if (Interlocked.Exchange(ref resolverInstalled, 1) != 0) return;
        try
        {
            NativeLibrary.SetDllImportResolver(typeof(ILGPU.Context).Assembly, Resolve);
        }
        catch (InvalidOperationException)
        {
            // ILGPU or the host already set a resolver for the assembly; theirs stays in charge.
        }
    }

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
    {
        if (!name.Contains("OpenCL", StringComparison.OrdinalIgnoreCase) || !OperatingSystem.IsLinux()) return IntPtr.Zero;
        foreach (var candidate in new[] { "libOpenCL.so", "libOpenCL.so.1" })
        {
            if (NativeLibrary.TryLoad(candidate, assembly, path, out var handle)) return handle;
        }

        return IntPtr.Zero;
    }

    /// <summary>
    /// ILGPU 1.5.3 requires OpenCL's generic address space, which OpenCL C 2.0 made optional and PoCL 3.x (reporting
    /// OpenCL C 1.2) does not offer, so it refuses the device with CapabilityNotSupportedException(GenericAddressSpace).
    /// PeftSharp's kernels take only global ArrayViews and local scalars and never form a pointer whose address space
    /// must be inferred at run time, so the code ILGPU generates for them compiles without it: measured on PoCL 3.1,
    /// every kernel here builds and matches its reference. The flag is set on the device's capability record (its
    /// setter is not public, hence reflection). Atomics still fail to build on PoCL; no kernel here uses them.
    /// </summary>
    /// <returns>True when the capability had to be forced on.</returns>
    public static bool ForceGenericAddressSpace(CLDevice device)
    {
        var caps = device.Capabilities;
        if (caps.GenericAddressSpace) return false;
        var property = typeof(CLCapabilityContext).GetProperty(nameof(CLCapabilityContext.GenericAddressSpace), BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic)
            ?? throw new InvalidOperationException("ILGPU's CLCapabilityContext.GenericAddressSpace was not found; this ILGPU version is not the 1.5.3 PeftSharp was written for");
        var setter = property.GetSetMethod(nonPublic: true)
            ?? throw new InvalidOperationException("ILGPU's CLCapabilityContext.GenericAddressSpace has no setter in this ILGPU version");
        setter.Invoke(caps, new object[] { true });
        return true;
    }
}
