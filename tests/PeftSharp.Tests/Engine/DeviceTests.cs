using NUnit.Framework;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;

namespace PeftSharp.Tests.Engine;

public sealed class DeviceTests
{
    [Test]
    public void Open_UnknownDevice_ErrorListsChoices()
    {
        var e = Assert.Throws<ArgumentException>(() => Devices.Open("tpu"))!;
        Assert.That(e.Message, Does.Contain("'tpu'").And.Contain("cpu"));
    }

    [Test]
    public void Open_AbsentCudaIndex_ErrorListsPresentDevices()
    {
        var e = Assert.Throws<ArgumentException>(() => Devices.Open("cuda:7"))!;
        Assert.That(e.Message, Does.Contain("cuda:7").And.Contain("present:").And.Contain("cpu"));
    }

    [Test]
    public void List_AlwaysHasCpuAndSimulator_AutoPicksAListedDevice()
    {
        var all = Devices.List();
        Assert.That(all.Select(d => d.Spec), Does.Contain("cpu").And.Contain("ilgpu-cpu"));
        Assert.That(all.Select(d => d.Spec), Does.Contain(Devices.AutoSpec(all)));
    }

    [Test]
    public void OpenDefault_HonoursEnvironmentVariable()
    {
        string? old = Environment.GetEnvironmentVariable(Devices.EnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(Devices.EnvironmentVariable, "cpu");
            using var d = Devices.OpenDefault();
            Assert.That(d.Info.Spec, Is.EqualTo("cpu"));
            Environment.SetEnvironmentVariable(Devices.EnvironmentVariable, "nonsense");
            Assert.Throws<ArgumentException>(() => Devices.OpenDefault());
        }
        finally
        {
            Environment.SetEnvironmentVariable(Devices.EnvironmentVariable, old);
        }
    }

    [Test]
    public void Tensor_DisposedOrOtherDevice_ClearErrors()
    {
        using var a = new CpuDevice();
        using var b = new CpuDevice();
        using var x = a.FromArray("x", new float[] { 1, 2 }, 2);
        using var y = b.Zeros("y", 2);
        var e = Assert.Throws<ArgumentException>(() => a.Ops.Copy(x, y))!;
        Assert.That(e.Message, Does.Contain("'y' [2]"));
        var z = a.Zeros("z", 2);
        z.Dispose();
        Assert.Throws<ObjectDisposedException>(() => a.Ops.Copy(x, z));
        var view = x.Reshape(1, 2);
        Assert.That(view.ToArray(), Is.EqualTo(new float[] { 1, 2 }));
        view.Dispose();
        Assert.That(x.ToArray(), Is.EqualTo(new float[] { 1, 2 }), "disposing a view leaves the owner intact");
    }

    [Test]
    public void FromArray_WrongLength_ErrorNamesTensor()
    {
        using var d = new CpuDevice();
        var e = Assert.Throws<ArgumentException>(() => d.FromArray("weights", new float[5], 2, 3))!;
        Assert.That(e.Message, Does.Contain("'weights' [2, 3]").And.Contain("got 5"));
        Assert.Throws<ArgumentException>(() => d.Zeros("neg", 2, -1));
    }

    [Test]
    public void CpuStorage_OfDisposedTensors_IsReusedCleared_AndViewsOfItAreDead()
    {
        using var d = new CpuDevice();
        var a = d.FromArray("a", Enumerable.Repeat(3f, 5000).ToArray(), 50, 100);
        var view = a.Reshape(5000);
        object storage = a.Storage;
        a.Dispose();
        var b = d.Zeros("b", 100, 50);
        Assert.That(b.Storage, Is.SameAs(storage), "an array of the same length is handed out again");
        Assert.That(b.ToArray(), Is.All.EqualTo(0f), "and comes back zero-filled");
        Assert.Throws<ObjectDisposedException>(() => d.Ops.Scale(view, 2f, b.Reshape(5000)), "a view of the disposed tensor cannot reach the reused array");
        using var other = d.Zeros("c", 4999);
        Assert.That(other.Storage, Is.Not.SameAs(storage), "only exact lengths are reused");
        var small = d.Zeros("small", 10);
        object smallStorage = small.Storage;
        small.Dispose();
        using var small2 = d.Zeros("small2", 10);
        Assert.That(small2.Storage, Is.Not.SameAs(smallStorage), "small arrays are left to the GC");

        b.Dispose();
        Assert.That(d.CachedBytes, Is.EqualTo(20000), "b's array waits in the pool");
        Assert.That(d.ReleaseCachedMemory(), Is.EqualTo(20000));
        Assert.That(d.CachedBytes, Is.EqualTo(0));
        using var c = d.Zeros("c", 5000);
        Assert.That(c.Storage, Is.Not.SameAs(storage), "released arrays are not handed out again");
    }

    [Test]
    public void BytesInUse_CountsOwnedStorageOnce_AndPeakHoldsTheHighWaterMark()
    {
        using var d = new CpuDevice();
        long start = d.BytesInUse;
        d.ResetPeakBytes();
        var a = d.Zeros("a", 10, 10);
        var view = a.Reshape(100);
        using var ids = d.FromIndices("ids", new[] { 1, 2, 3 });
        Assert.That(d.BytesInUse - start, Is.EqualTo(400 + 12), "a view holds no storage of its own");
        var b = d.Zeros("b", 50);
        Assert.That(d.PeakBytesInUse - start, Is.EqualTo(612));
        a.Dispose();
        view.Dispose();
        a.Dispose();
        b.Dispose();
        Assert.That(d.BytesInUse - start, Is.EqualTo(12), "disposing twice, or disposing a view, frees nothing more");
        Assert.That(d.PeakBytesInUse - start, Is.EqualTo(612), "the peak stays until reset");
        d.ResetPeakBytes();
        Assert.That(d.PeakBytesInUse, Is.EqualTo(d.BytesInUse));
    }
    [Test]
    public void StoragePool_UnderBatchesOfVaryingShape_KeepsAtMostTwiceTheLivePeak_AndStillReuses()
    {
        var pool = new PeftSharp.Engine.Cpu.StoragePool();
        var random = new Random(5);
        const int big = 1 << 20; // 4 MiB arrays: a live peak of 16 MiB, above the pool's minimum cap
        for (int round = 0; round < 100; round++)
        {
            // A "batch": four activations whose lengths follow the batch's size, live together, then all returned.
            int rows = 1 + random.Next(64);
            var live = Enumerable.Range(1, 4).Select(k => pool.Rent(big + k * 1000 + rows * 7)).ToList();
            foreach (var a in live) pool.Return(a);
            Assert.That(pool.PooledBytes, Is.LessThanOrEqualTo(Math.Max(2 * pool.LiveBytes.PeakLive, PeftSharp.Engine.Cpu.StoragePool.MinCapBytes)), $"round {round}");
        }

        Assert.That(pool.LiveBytes.PeakLive, Is.LessThan(4L * 4 * (big + 5000)), "one batch's worth at the peak");
        Assert.That(pool.LiveBytes.Live, Is.EqualTo(0));
        Assert.That(pool.PooledBytes, Is.GreaterThan(pool.LiveBytes.PeakLive), "the cap is reached: old lengths were evicted, not the pool emptied");

        // A repeating shape (a training step) is served from the pool after its first round.
        long misses = pool.Misses;
        for (int step = 0; step < 5; step++)
        {
            var arrays = new[] { pool.Rent(big + 17), pool.Rent(big + 29) };
            foreach (var a in arrays) pool.Return(a);
        }

        Assert.That(pool.Misses - misses, Is.EqualTo(2), "only the first step allocated; older lengths were dropped for these");
    }

    [Test]
    public void StoragePool_TrainingSteps_AllocateNothingAfterTheFirst()
    {
        using var device = new PeftSharp.Engine.Cpu.CpuDevice();
        var config = PeftSharp.Model.LlamaConfig.Tiny with { NumHiddenLayers = 2, HiddenSize = 64 };
        using var model = PeftSharp.Model.LlamaModel.Create(device, config, seed: 1);
        var ids = PeftSharp.Tests.Infrastructure.TestData.Ints(4 * 64, 1, config.VocabSize);
        var targets = PeftSharp.Tests.Infrastructure.TestData.Ints(4 * 64, 2, config.VocabSize);
        for (int step = 0; step < 2; step++)
        {
            model.ZeroGrad();
            model.Loss(ids, targets, 4, backward: true);
        }

        long misses = device.PoolMisses;
        for (int step = 0; step < 3; step++)
        {
            model.ZeroGrad();
            model.Loss(ids, targets, 4, backward: true);
        }

        Assert.That(device.PoolMisses, Is.EqualTo(misses), "a repeating step reuses every array it returned");
    }
}
