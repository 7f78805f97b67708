using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using Perfolizer.Horology;

namespace PeftSharp.Bench;

/// <summary>
/// In-process runs (no per-benchmark project build), a few iterations of ~250 ms each: enough for stable means of
/// kernels that take milliseconds to seconds, and a whole suite that fits in minutes on 2 cores.
/// </summary>
internal class BenchConfig : ManualConfig
{
    public BenchConfig()
    {
        AddJob(Job.Default
            .WithToolchain(InProcessEmitToolchain.Instance)
            .WithLaunchCount(1)
            .WithWarmupCount(2)
            .WithIterationCount(6)
            .WithIterationTime(TimeInterval.FromMilliseconds(250)));
        WithOptions(ConfigOptions.DisableOptimizationsValidator);
        WithSummaryStyle(BenchmarkDotNet.Reports.SummaryStyle.Default.WithMaxParameterColumnWidth(40));
    }
}
