using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;

namespace PeftSharp.Engine;

/// <summary>
/// A compute device: owns tensors and implements every op. Callers use <see cref="Ops"/>, which checks shapes
/// and devices and then calls the unchecked <c>*Core</c> methods each backend implements.
/// </summary>
public abstract class Device : IDisposable
{
    protected Device()
    {
        Ops = new Ops(this);
    }

    public abstract DeviceInfo Info { get; }

    /// <summary>The checked op surface.</summary>
    public Ops Ops { get; }

    public bool IsDisposed { get; private set; }

    private long bytesInUse, peakBytesInUse;

    /// <summary>Bytes of storage held by this device's live tensors and index tensors (views hold none).</summary>
    public long BytesInUse => Interlocked.Read(ref bytesInUse);

    /// <summary>The largest <see cref="BytesInUse"/> since the device opened or <see cref="ResetPeakBytes"/> ran.</summary>
    public long PeakBytesInUse => Interlocked.Read(ref peakBytesInUse);

    /// <summary>Starts a new peak measurement from the bytes in use now.</summary>
    public void ResetPeakBytes() => Interlocked.Exchange(ref peakBytesInUse, BytesInUse);

    /// <summary>
    /// Bytes the backend keeps from disposed tensors to reuse (the CPU backend's array pool; not part of
    /// <see cref="BytesInUse"/>).
    /// </summary>
    public virtual long CachedBytes => 0;

    /// <summary>Gives the memory behind <see cref="CachedBytes"/> back (to the GC on the CPU backend); returns how much.</summary>
    public virtual long ReleaseCachedMemory() => 0;

    internal void TrackBytes(long delta)
    {
        long now = Interlocked.Add(ref bytesInUse, delta);
        long peak;
        while (now > (peak = Interlocked.Read(ref peakBytesInUse)) && Interlocked.CompareExchange(ref peakBytesInUse, now, peak) != peak)
        {
        }
    }

    /// <summary>A zero-filled tensor.</summary>
    public Tensor Zeros(string name, params int[] shape) => NewTensor(name, shape, zeroed: true);

    /// <summary>
    /// A tensor for an op to write: its contents are unspecified until then (ops overwrite their outputs unless they
    /// say they accumulate). The CPU backend hands out a reused array without zeroing it, which a forward pass of a
    /// model would otherwise spend several percent of its time on; other backends zero it as <see cref="Zeros"/> does.
    /// </summary>
    public Tensor Empty(string name, params int[] shape) => NewTensor(name, shape, zeroed: false);

    private Tensor NewTensor(string name, int[] shape, bool zeroed)
    {
        ThrowIfDisposed();
        var copy = (int[])shape.Clone();
        int length = ShapeUtil.Product(copy, name);
        return new Tensor(this, name, copy, zeroed ? AllocateStorage(length) : AllocateUninitializedStorage(length), 0, ownsStorage: true);
    }

    /// <summary>A tensor holding <paramref name="data"/> (length must equal the product of the shape).</summary>
    public Tensor FromArray(string name, ReadOnlySpan<float> data, params int[] shape)
    {
        var t = Zeros(name, shape);
        if (data.Length != t.Length)
        {
            t.Dispose();
            throw new ArgumentException($"tensor '{name}' {ShapeUtil.Format(shape)} needs {ShapeUtil.Product(shape, name)} values, got {data.Length}");
        }

        Upload(t, data);
        return t;
    }

    /// <summary>An index tensor; the shape defaults to [data.Length].</summary>
    public IndexTensor FromIndices(string name, ReadOnlySpan<int> data, params int[] shape)
    {
        ThrowIfDisposed();
        var s = shape.Length == 0 ? new[] { data.Length } : (int[])shape.Clone();
        if (ShapeUtil.Product(s, name) != data.Length)
        {
            throw new ArgumentException($"index tensor '{name}' {ShapeUtil.Format(s)} needs {ShapeUtil.Product(s, name)} values, got {data.Length}");
        }

        var host = data.ToArray();
        return new IndexTensor(this, name, s, host, AllocateIndexStorage(host));
    }

    /// <summary>
    /// A tensor placed <paramref name="pad"/> elements into a larger buffer whose padding holds <paramref name="sentinel"/>;
    /// <see cref="ReadPadding"/> returns the padding. Tests use it to catch out-of-bounds writes.
    /// </summary>
    internal Tensor CreatePadded(string name, int pad, float sentinel, params int[] shape)
    {
        int length = ShapeUtil.Product(shape, name);
        var storage = AllocateStorage(length + 2 * pad);
        var fill = new float[length + 2 * pad];
        Array.Fill(fill, sentinel);
        Upload(new Tensor(this, name, new[] { length + 2 * pad }, storage, 0, ownsStorage: false), fill);
        return new Tensor(this, name, (int[])shape.Clone(), storage, pad, ownsStorage: true);
    }

    internal float[] ReadPadding(Tensor t, int pad)
    {
        var whole = new Tensor(this, t.Name, new[] { t.Length + 2 * pad }, t.Storage, t.Offset - pad, ownsStorage: false);
        var all = whole.ToArray();
        return all[..pad].Concat(all[(pad + t.Length)..]).ToArray();
    }

    /// <summary>Waits until every queued op has finished.</summary>
    public virtual void Synchronize()
    {
    }

    protected void ThrowIfDisposed()
    {
        if (IsDisposed) throw new ObjectDisposedException($"device {Info.Spec}");
    }

    public void Dispose()
    {
        if (IsDisposed) return;
        IsDisposed = true;
        DisposeCore();
        GC.SuppressFinalize(this);
    }

    protected virtual void DisposeCore()
    {
    }

    public override string ToString() => Info.ToString();

    // Storage. AllocateStorage is zero-filled; AllocateUninitializedStorage (for Empty) need not be.
    internal abstract object AllocateStorage(int length);
    internal virtual object AllocateUninitializedStorage(int length) => AllocateStorage(length);
    internal abstract object AllocateIndexStorage(int[] values);
    internal abstract void ReleaseStorage(object storage);
    internal abstract void Upload(Tensor t, ReadOnlySpan<float> source);
    internal abstract void Download(Tensor t, Span<float> destination);

    // Ops, unchecked: Ops validates before calling. Outputs are overwritten unless the op says it accumulates.
    internal abstract void MatMulCore(Tensor a, Tensor b, Tensor c, MatMulShape s, float alpha, float beta);
    internal abstract void AddCore(Tensor a, Tensor b, Tensor y);
    internal abstract void MulCore(Tensor a, Tensor b, Tensor y);
    internal abstract void ScaleCore(Tensor x, float s, Tensor y);
    internal abstract void ScaleColumnsCore(Tensor x, Tensor c, Tensor y, int cols);
    internal abstract void AxpyCore(float alpha, Tensor x, Tensor y);
    internal abstract void FillCore(Tensor y, float value);
    internal abstract void CopyCore(Tensor source, Tensor destination);
    internal abstract void SiluCore(Tensor x, Tensor y);
    internal abstract void TanhCore(Tensor x, Tensor y);
    internal abstract void TanhBackwardCore(Tensor y, Tensor dy, Tensor dx);
    internal abstract void SiluBackwardCore(Tensor x, Tensor dy, Tensor dx);
    internal abstract void SwiGluCore(Tensor gate, Tensor up, Tensor y);
    internal abstract void SwiGluBackwardCore(Tensor gate, Tensor up, Tensor dy, Tensor dGate, Tensor dUp);

    /// <summary>y (M, N) = silu(x wGate^T) * (x wUp^T); by default two products into temporaries and the SwiGLU.</summary>
    internal virtual void LinearSwiGluCore(Tensor x, Tensor wGate, Tensor wUp, Tensor y, int m, int n, int k)
    {
        using var gate = Empty("gate", m, n);
        using var up = Empty("up", m, n);
        var shape = new MatMulShape(1, m, n, k, false, true, true);
        MatMulCore(x, wGate, gate, shape, 1f, 0f);
        MatMulCore(x, wUp, up, shape, 1f, 0f);
        SwiGluCore(gate, up, y);
    }
    internal abstract void SoftmaxCore(Tensor x, Tensor y, int rows, int cols);
    internal abstract void SoftmaxBackwardCore(Tensor y, Tensor dy, Tensor dx, int rows, int cols);
    internal abstract void RmsNormCore(Tensor x, Tensor w, Tensor y, Tensor rstd, int rows, int dim, float eps);
    internal abstract void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor dx, Tensor dw, int rows, int dim);
    internal abstract void RopeCore(Tensor x, IndexTensor positions, Tensor y, int tokens, int heads, int dim, float theta, bool inverse, RopeScaling scaling);
    internal abstract void AttentionCore(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, AttentionShape s);
    internal abstract void AttentionMergeCore(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2, Tensor o, Tensor lse, int rows, int d);
    internal abstract void AttentionBackwardCore(
        Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv, AttentionShape s);
    internal abstract void EmbeddingCore(IndexTensor ids, Tensor table, Tensor y, int dim);
    internal abstract void EmbeddingBackwardCore(IndexTensor ids, Tensor dy, Tensor dtable, int dim);
    internal abstract void CrossEntropyCore(Tensor logits, IndexTensor targets, Tensor losses, int vocab, int ignoreIndex);
    internal abstract void CrossEntropyBackwardCore(Tensor logits, IndexTensor targets, Tensor dlogits, int vocab, int ignoreIndex, float scale);
    internal abstract void AdamWCore(Tensor p, Tensor g, Tensor m, Tensor v, AdamWStep step);
    internal abstract void SgdCore(Tensor p, Tensor g, Tensor? momentum, SgdStep step);
    internal abstract double SumCore(Tensor x, bool squares);
    internal abstract void LoraMixedCore(Tensor x, Tensor y, LoraAdapterPool pool, IndexTensor rowAdapters, LoraBatchShape s);
    internal abstract void DoraScaleCore(Tensor y, Tensor scales, IndexTensor rowSlots, int n);
    internal abstract void LoraMixedBackwardCore(Tensor x, Tensor dy, LoraAdapterPool pool, IndexTensor rowAdapters, Tensor? dx, Tensor da, Tensor db, LoraBatchShape s);
    internal abstract void MaskedAdamWCore(Tensor p, Tensor g, IndexTensor idx, Tensor m, Tensor v, AdamWStep step);
    internal abstract void MaskedSgdCore(Tensor p, Tensor g, IndexTensor idx, Tensor? momentum, SgdStep step);
    internal abstract void ScatterAddCore(Tensor w, IndexTensor idx, Tensor values, float alpha);
    internal abstract void GatherCore(Tensor w, IndexTensor idx, Tensor values);
    internal abstract void ScatterCore(Tensor w, IndexTensor idx, Tensor values);
    internal abstract void DareCore(Tensor x, Tensor y, float p, int seed);
    internal abstract void AbsAddCore(Tensor x, Tensor acc);

    /// <summary>Radix-select pass: the 256-bin histogram of the digit at <paramref name="shift"/> of the keys matching prefix under prefixMask.</summary>
    internal abstract int[] SelectHistogramCore(Tensor x, SelectScore score, uint prefix, uint prefixMask, int shift, int chunk);

    /// <summary>The band's indices, ascending (see <see cref="SelectKernels"/>); exactly <paramref name="count"/> of them.</summary>
    internal abstract int[] SelectWriteCore(Tensor x, SelectScore score, SelectBand band, int count);
    internal abstract void SparseDeltaMixedCore(Tensor x, Tensor y, SparseDeltaPool pool, IndexTensor rowVariants, int rows);

    /// <summary>
    /// The order this device keeps a 1-bit pool's words in: the format's (slots, N, W) row-major order unless the
    /// backend's kernels read another (same word count either way).
    /// </summary>
    internal virtual int[] ArrangeBitDeltaWords(int[] words, int outFeatures, int wordsPerRow) => words;

    internal abstract void BitDeltaMixedCore(Tensor x, Tensor y, BitDeltaPool pool, IndexTensor rowVariants, BitDeltaShape s);
    internal abstract void BitDeltaDecodeCore(BitDeltaPool pool, int slot, Tensor dense, float alpha, float beta, BitDeltaShape s);
}
