using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace PeftSharp.Bench;

/// <summary>Shows GFLOP/s from the mean time and the case's FLOP count, and that as a fraction of <see cref="PeakProbe"/>.</summary>
internal sealed class ThroughputColumn : IColumn
{
    private readonly Func<BenchmarkCase, double> flops;
    private readonly bool fraction;

    public ThroughputColumn(Func<BenchmarkCase, double> flops, bool fraction)
    {
        this.flops = flops;
        this.fraction = fraction;
    }

    public string Id => fraction ? "PeakFraction" : "GFlops";
    public string ColumnName => fraction ? $"of peak ({PeakProbe.GFlops:F0})" : "GFLOP/s";
    public bool AlwaysShow => true;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => fraction ? 1 : 0;
    public bool IsNumeric => true;
    public UnitType UnitType => UnitType.Dimensionless;
    public string Legend => fraction ? "GFLOP/s over the measured fp32 FMA peak of all cores" : "useful floating-point operations per second";

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase)
    {
        var report = summary[benchmarkCase];
        if (report?.ResultStatistics == null) return "-";
        double gflops = flops(benchmarkCase) / report.ResultStatistics.Mean; // FLOP per ns = GFLOP/s
        return fraction ? $"{gflops / PeakProbe.GFlops:P0}" : $"{gflops:F1}";
    }

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) => GetValue(summary, benchmarkCase);
    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    public bool IsAvailable(Summary summary) => true;

    internal static int Param(BenchmarkCase c, string name) => (int)c.Parameters[name];
}
