using PeftSharp.Engine;

namespace PeftSharp.Bench;

/// <summary>
/// The device the device-agnostic benchmarks (LoRA, 1-bit, grouped attention, the targets run) use: `cpu` unless
/// PEFTSHARP_BENCH_DEVICE names another (`cuda`, `opencl`), so the same benchmarks measure a GPU when one is lent.
/// Benchmarks that compare against ONNX Runtime or name a backend in their rows keep their own devices.
/// </summary>
internal static class BenchDevice
{
    public const string EnvironmentVariable = "PEFTSHARP_BENCH_DEVICE";

    public static string Spec => Environment.GetEnvironmentVariable(EnvironmentVariable) is { Length: > 0 } s ? s : "cpu";

    public static Device Open() => Devices.Open(Spec);
}
