namespace PeftSharp.Engine;

/// <summary>One row of a self-check: an op on a device against its double-precision reference.</summary>
public sealed record SelfCheckResult(string Op, string Shape, double MaxError, double Tolerance, TimeSpan Elapsed)
{
    public bool Passed => MaxError <= Tolerance;
}
