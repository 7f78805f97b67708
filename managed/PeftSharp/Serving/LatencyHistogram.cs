namespace PeftSharp.Serving;

/// <summary>
/// A Prometheus histogram of latencies in seconds: how many observations fell at or below each bound (cumulative, as
/// Prometheus' buckets are), their count and their sum. <see cref="VariantServer"/> keeps one per vLLM latency metric.
/// </summary>
public sealed record LatencyHistogram(IReadOnlyList<double> Bounds, IReadOnlyList<long> CumulativeCounts, long Count, double Sum)
{
    /// <summary>vLLM's buckets for vllm:time_to_first_token_seconds.</summary>
    public static readonly double[] FirstTokenBounds =
    {
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    };

    /// <summary>vLLM's buckets for its request-level latencies (vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds).</summary>
    public static readonly double[] RequestBounds =
    {
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
    };

    /// <summary>No observation yet.</summary>
    public static LatencyHistogram Empty(double[] bounds) => new(bounds, new long[bounds.Length], 0, 0);

    /// <summary>This histogram with one more observation of <paramref name="seconds"/>.</summary>
    public LatencyHistogram With(double seconds)
    {
        var counts = CumulativeCounts.ToArray();
        for (int i = 0; i < counts.Length; i++)
        {
            if (seconds <= Bounds[i]) counts[i]++;
        }

        return new LatencyHistogram(Bounds, counts, Count + 1, Sum + seconds);
    }
}
