using NUnit.Framework;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Tests.Engine.Cpu;

/// <summary>The CPU backend's own parallel loop (<see cref="Cores.For"/>): its workers, nesting, errors and callers on several threads.</summary>
public sealed class CoresTests
{
    [TestCase(0)]
    [TestCase(1)]
    [TestCase(2)]
    [TestCase(1000)]
    public void For_RunsEveryIndexExactlyOnce(int count)
    {
        for (int round = 0; round < 20; round++)
        {
            var hits = new int[count];
            Cores.For(count, i => Interlocked.Increment(ref hits[i]));
            Assert.That(hits.All(h => h == 1), $"round {round}: every index once");
        }
    }

    [Test]
    public void For_AfterTheWorkersSleep_StillCompletes_AndUsesThem()
    {
        // Past the workers' spin (1 ms) they block; the next loop must wake them, not lose its work.
        var threads = new HashSet<int>();
        for (int round = 0; round < 5; round++)
        {
            Thread.Sleep(20);
            var hits = new int[64];
            Cores.For(64, i =>
            {
                lock (threads) threads.Add(Environment.CurrentManagedThreadId);
                Thread.SpinWait(20_000);
                Interlocked.Increment(ref hits[i]);
            });
            Assert.That(hits.All(h => h == 1), $"round {round}");
        }

        if (Environment.ProcessorCount > 1) Assert.That(threads.Count, Is.GreaterThan(1), "the loops ran on more than the calling thread");
    }

    [Test]
    public void For_NestedLoop_RunsInsideTheOuterOne()
    {
        var hits = new int[16 * 16];
        Cores.For(16, i => Cores.For(16, j => Interlocked.Increment(ref hits[i * 16 + j])));
        Assert.That(hits.All(h => h == 1));
    }

    [Test]
    public void For_BodyThrows_RethrowsAfterEveryOtherIndexRan_AndTheNextLoopWorks()
    {
        var hits = new int[100];
        var e = Assert.Throws<InvalidOperationException>(() => Cores.For(100, i =>
        {
            Interlocked.Increment(ref hits[i]);
            if (i == 37) throw new InvalidOperationException("index 37");
        }))!;
        Assert.That(e.Message, Is.EqualTo("index 37"), "the body's own exception, not an AggregateException");
        Assert.That(e.StackTrace, Does.Contain(nameof(For_BodyThrows_RethrowsAfterEveryOtherIndexRan_AndTheNextLoopWorks)), "with the body's stack");
        Assert.That(hits.All(h => h == 1), "the other indexes still ran, once each");
        var again = new int[100];
        Cores.For(100, i => Interlocked.Increment(ref again[i]));
        Assert.That(again.All(h => h == 1));
    }

    [Test]
    public void For_BodyThrowsInALoopThatRunsSerially_IsTheSameExceptionAndEveryIndexRan()
    {
        var hits = new int[10];
        // The inner loop runs on the calling thread (a loop inside a loop): the serial path, as under contention.
        var e = Assert.Throws<ArgumentException>(() => Cores.For(2, i =>
        {
            if (i != 0) return;
            Cores.For(10, j =>
            {
                hits[j]++;
                if (j == 3) throw new ArgumentException("index 3");
            });
        }))!;
        Assert.That(e.Message, Is.EqualTo("index 3"));
        Assert.That(hits.All(h => h == 1), "the serial path runs the other indexes too");
    }

    [Test]
    public void For_CallersOnSeveralThreads_EachGetsAllItsIndexes()
    {
        const int callers = 4, count = 500;
        var hits = new int[callers, count];
        var threads = Enumerable.Range(0, callers).Select(c => new Thread(() =>
        {
            for (int round = 0; round < 50; round++) Cores.For(count, i => Interlocked.Increment(ref hits[c, i]));
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        for (int c = 0; c < callers; c++)
        for (int i = 0; i < count; i++)
        {
            Assert.That(hits[c, i], Is.EqualTo(50), $"caller {c}, index {i}");
        }
    }
}
