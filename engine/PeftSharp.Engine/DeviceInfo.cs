namespace PeftSharp.Engine;

/// <summary>What <c>peft devices</c> prints about a device.</summary>
/// <param name="Spec">The string that opens it: cpu, cuda:0, opencl:0, ilgpu-cpu.</param>
public sealed record DeviceInfo(string Spec, DeviceKind Kind, string Name, long MemoryBytes, int WarpSize, int MaxGroupSize, string Detail)
{
    public override string ToString() => $"{Spec} ({Name})";
}
