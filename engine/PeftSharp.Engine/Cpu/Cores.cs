namespace PeftSharp.Engine.Cpu;

/// <summary>
/// How the CPU backend spreads work: one thread per core. Parallel.For without a limit runs its body on the calling
/// thread and on as many pool threads as it can get, and the pool keeps at least one thread per core besides the
/// caller, so on two cores three threads shared them: tasks measured in a two-core GEMM summed to 1.03-1.25x twice the
/// wall time, each thread's cache blocks evicted by the others' preemption. With the limit, 1024 x 512..1376 products
/// ran 2-8% faster (medians, interleaved in one process). Public so code that runs its own parallel loops over tensors
/// (the managed layer's merges) spreads them the same way.
/// </summary>
public static class Cores
{
    public static readonly ParallelOptions Options = new() { MaxDegreeOfParallelism = Environment.ProcessorCount };
}
