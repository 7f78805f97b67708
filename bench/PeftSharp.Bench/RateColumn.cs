using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace PeftSharp.Bench;

/// <summary>
/// An amount per second from the mean time and the amount one call must process (FLOPs: GFLOP/s; bytes read: GB/s),
/// or that as a fraction of the machine's measured limit (<see cref="PeakProbe"/>, <see cref="BandwidthProbe"/>).
/// </summary>
internal sealed class RateColumn(string id, string unit, string legend, Func<BenchmarkCase, double> perCall, Func<double>? limit, string limitName, int priority)
    : CustomColumn(id, legend, priority)
{
    /// <summary>GFLOP/s of useful work, or its fraction of the fp32 FMA peak of all cores.</summary>
    public static RateColumn Flops(Func<BenchmarkCase, double> flops, bool fraction) => fraction
        ? new("PeakFraction", "", "GFLOP/s over the measured fp32 FMA peak of all cores", flops, () => PeakProbe.GFlops, "peak", 1)
        : new("GFlops", "GFLOP/s", "useful floating-point operations per second", flops, null, "", 0);

    /// <summary>GB/s of the bytes a method must read, or its fraction of the measured memory read bandwidth.</summary>
    public static RateColumn Bandwidth(Func<BenchmarkCase, double> bytes, bool fraction) => fraction
        ? new("BandwidthFraction", " GB/s", "GB/s over the measured memory read bandwidth", bytes, () => BandwidthProbe.GBps, "bandwidth", 3)
        : new("GBps", "GB/s", "bytes the method must read (weights, packed signs) per second", bytes, null, "", 2);

    public override string ColumnName => limit == null ? unit : $"of {limitName} ({limit():F0}{unit})";

    public override string GetValue(Summary summary, BenchmarkCase benchmarkCase)
    {
        var report = summary[benchmarkCase];
        if (report?.ResultStatistics == null) return "-";
        double rate = perCall(benchmarkCase) / report.ResultStatistics.Mean; // per ns = G per s
        return limit == null ? $"{rate:F1}" : $"{rate / limit():P0}";
    }
}
