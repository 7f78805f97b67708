using System.Diagnostics;
using System.Runtime.ExceptionServices;

namespace PeftSharp.Engine.Cpu;

/// <summary>
/// How the CPU backend spreads work: one thread per core. Parallel.For without a limit runs its body on the calling
/// thread and on as many pool threads as it can get, and the pool keeps at least one thread per core besides the
/// caller, so on two cores three threads shared them: tasks measured in a two-core GEMM summed to 1.03-1.25x twice the
/// wall time, each thread's cache blocks evicted by the others' preemption. With the limit, 1024 x 512..1376 products
/// ran 2-8% faster (medians, interleaved in one process). Public so code that runs its own parallel loops over tensors
/// (the managed layer's merges) spreads them the same way.
/// </summary>
internal static class Cores
{
    public static readonly ParallelOptions Options = new() { MaxDegreeOfParallelism = Environment.ProcessorCount };

    /// <summary>
    /// body(i) for 0 &lt;= i &lt; count on the calling thread and the backend's own workers (one per other core), each
    /// taking the next index as it finishes one; returns when all are done. A body's exception is rethrown as itself,
    /// with its own stack trace, whichever thread ran it and whether or not the loop ran serially (the first one, when
    /// several bodies throw), so a caller catches the same type either way. The workers spin for a while after each loop before they sleep: a
    /// thread-pool worker woke about 50 us after a loop that followed a short serial stretch, and a model's forward is a
    /// few hundred loops back to back (letting .NET's pool workers spin longer made the 20M forward 3-4% faster).
    /// A loop started inside another, or while another thread's loop holds the workers, runs on the calling thread.
    /// Measured against Parallel.For (with <see cref="Options"/>) interleaved in one process, medians: 20M forward
    /// 227 against 234 ms, training step 699 against 732 ms, decode step 3.5 against 4.5 ms; tiny forward 3.6 against
    /// 4.6 ms.
    /// </summary>
    public static void For(int count, Action<int> body)
    {
        if (count <= 0) return;
        if (count == 1 || WorkerCount == 0 || insideLoop || !Monitor.TryEnter(Gate))
        {
            var serial = new Job(body, count);
            serial.Work(); // every index runs, as on the workers
            if (serial.Error != null) ExceptionDispatchInfo.Capture(serial.Error).Throw();
            return;
        }

        try
        {
            var job = new Job(body, count);
            Volatile.Write(ref current, job);
            Interlocked.Increment(ref generation);
            int sleeping = Interlocked.Exchange(ref sleepers, 0);
            if (sleeping > 0) Wake.Release(sleeping);
            EnsureStarted();
            insideLoop = true;
            try
            {
                job.Work();
            }
            finally
            {
                insideLoop = false;
            }

            var spin = new SpinWait();
            while (Volatile.Read(ref job.Running) > 0) spin.SpinOnce(-1);
            Volatile.Write(ref current, null);
            if (job.Error != null) ExceptionDispatchInfo.Capture(job.Error).Throw();
        }
        finally
        {
            Monitor.Exit(Gate);
        }
    }

    private static readonly int WorkerCount = Environment.ProcessorCount - 1;
    private static readonly object Gate = new();
    private static readonly SemaphoreSlim Wake = new(0);
    private static readonly long SpinTicks = Stopwatch.Frequency / 1000; // 1 ms of spinning before a worker sleeps
    private static int started;
    private static Job? current;
    private static long generation;
    private static int sleepers;

    [ThreadStatic]
    private static bool insideLoop;

    private sealed class Job(Action<int> body, int count)
    {
        private int next = -1;
        public int Running;
        public Exception? Error;

        public void Work()
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < count)
            {
                try
                {
                    body(i);
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref Error, e, null);
                }
            }
        }
    }

    private static void EnsureStarted()
    {
        if (Volatile.Read(ref started) != 0 || Interlocked.Exchange(ref started, 1) != 0) return;
        for (int w = 0; w < WorkerCount; w++)
        {
            new Thread(WorkerLoop) { IsBackground = true, Name = $"PeftSharp CPU worker {w + 1}" }.Start();
        }
    }

    private static void WorkerLoop()
    {
        insideLoop = true; // a body that starts a loop of its own runs it here, serially
        long seen = Interlocked.Read(ref generation);
        while (true)
        {
            long now = Interlocked.Read(ref generation);
            if (now == seen)
            {
                long until = Stopwatch.GetTimestamp() + SpinTicks;
                while ((now = Interlocked.Read(ref generation)) == seen && Stopwatch.GetTimestamp() < until) Thread.SpinWait(20);
            }

            if (now == seen)
            {
                Interlocked.Increment(ref sleepers);
                // A loop that started after the last check has already taken the count and released the semaphore
                // for it, or will see this worker in sleepers; either way a wake that finds nothing new is harmless.
                if (Interlocked.Read(ref generation) == seen) Wake.Wait();
                continue;
            }

            seen = now;
            var job = Volatile.Read(ref current);
            if (job == null) continue;
            Interlocked.Increment(ref job.Running);
            try
            {
                job.Work();
            }
            finally
            {
                Interlocked.Decrement(ref job.Running);
            }
        }
    }
}
