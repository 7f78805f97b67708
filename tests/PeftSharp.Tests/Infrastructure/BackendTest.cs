using NUnit.Framework;
using PeftSharp.Engine;

namespace PeftSharp.Tests.Infrastructure;

/// <summary>
/// Base of the per-backend op tests: the fixture runs once per backend in <see cref="TestBackends.All"/>. Outputs
/// are created inside NaN-filled padding and start as NaN, so a kernel that reads an output it should only write,
/// or writes out of bounds, fails.
/// </summary>
[TestFixtureSource(typeof(TestBackends), nameof(TestBackends.All))]
public abstract class BackendTest
{
    protected const int Pad = 37;
    private readonly List<IDisposable> owned = new();

    protected BackendTest(string backend) => Backend = backend;

    protected string Backend { get; }

    protected Device Device { get; private set; } = null!;

    protected Ops Ops => Device.Ops;

    /// <summary>True on ILGPU's CPU simulator, where only tiny shapes are affordable.</summary>
    protected bool IsSimulator => Backend is TestBackends.SimWarp4 or TestBackends.SimWarp32;

    [SetUp]
    public void OpenDevice() => Device = TestBackends.Get(Backend);

    [TearDown]
    public void DisposeTensors()
    {
        foreach (var d in owned) d.Dispose();
        owned.Clear();
    }

    protected Tensor Input(string name, float[] data, params int[] shape) => Own(Device.FromArray(name, data, shape));

    protected IndexTensor Indices(string name, int[] data) => Own(Device.FromIndices(name, data));

    /// <summary>An output tensor filled with NaN, inside NaN padding.</summary>
    protected Tensor Output(string name, params int[] shape)
    {
        var t = Own(Device.CreatePadded(name, Pad, float.NaN, shape));
        return t;
    }

    /// <summary>Compares an output with the reference and checks its padding.</summary>
    protected void Expect(Tensor actual, float[] expected, (double Atol, double Rtol) tol, string what)
    {
        Check.Close(actual.ToArray(), expected, tol, $"{Backend} {what}");
        if (actual.Offset == Pad) Check.PaddingUntouched(Device.ReadPadding(actual, Pad), $"{Backend} {what}");
    }

    protected T Own<T>(T d)
        where T : IDisposable
    {
        owned.Add(d);
        return d;
    }
}
