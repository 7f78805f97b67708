using BenchmarkDotNet.Running;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- --filter '*MatMulBench*'   (or '*' for everything)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- interleaved [tiny|20M] [rounds] [pause ms]   (see Interleaved)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serving-memory [rounds] [requests]   (see ServingMemory)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serve-load [tiny|20M] [requests] [clients]   (see ServeLoad)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- serve-step [tiny|20M] [rows] [seconds]   (see ServeStep)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- scale [180M|1.1B]   (see ScaleBench: real model sizes, BF16 files)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- gemm [rounds]   (see GemmProbe: CPU backend vs ONNX Runtime, interleaved)
/// dotnet run --project bench/PeftSharp.Bench -c Release -- targets [--small]   (see Targets; PEFTSHARP_BENCH_DEVICE=cuda)
/// Prints the measured fp32 FMA peak first; every GFLOP/s figure is also shown as a fraction of it.
/// </summary>
public static class Program
{
    public static void Main(string[] args)
    {
        Console.WriteLine($"// fp32 FMA peak, {Environment.ProcessorCount} threads: {PeakProbe.GFlops:F1} GFLOP/s");
        if (args.Length > 0 && args[0] == "interleaved")
        {
            Interleaved.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "serving-memory")
        {
            ServingMemory.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "serve-load")
        {
            ServeLoad.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "serve-step")
        {
            ServeStep.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "scale")
        {
            ScaleBench.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "gemm")
        {
            GemmProbe.Run(args[1..]);
            return;
        }

        if (args.Length > 0 && args[0] == "targets")
        {
            Targets.Run(args[1..]);
            return;
        }

        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        Console.WriteLine($"// fp32 FMA peak, {Environment.ProcessorCount} threads: {PeakProbe.GFlops:F1} GFLOP/s");
    }
}
