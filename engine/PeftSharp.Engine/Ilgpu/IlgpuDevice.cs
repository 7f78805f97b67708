using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;
using PeftSharp.Engine.Cpu;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;
using Buffer = ILGPU.Runtime.MemoryBuffer1D<float, ILGPU.Stride1D.Dense>;
using IndexBuffer = ILGPU.Runtime.MemoryBuffer1D<int, ILGPU.Stride1D.Dense>;

namespace PeftSharp.Engine.Ilgpu;

/// <summary>Which matmul kernel an ILGPU device runs.</summary>
internal enum MatMulAlgorithm
{
    /// <summary>Tiled where the device's groups hold Tile x Tile threads and the output spans a tile, else naive.</summary>
    Auto,
    Naive,
    Tiled,
}

/// <summary>Which attention kernels (forward and backward) an ILGPU device runs.</summary>
internal enum AttentionAlgorithm
{
    /// <summary>Tiled where the head dimension fits its tiles (D &lt;= 128) and the device allows groups of 32 threads with 33 KB of shared memory, else per row.</summary>
    Auto,
    /// <summary>One thread per query row reading every key from global memory (<see cref="AttentionKernels.ForwardKernel"/>).</summary>
    PerRow,
    /// <summary>Groups of query rows sharing key tiles in shared memory, keys split across groups (<see cref="TiledAttentionKernels"/>).</summary>
    Tiled,
}

/// <summary>
/// A device run by ILGPU kernels (CUDA, OpenCL, or ILGPU's CPU simulator). Owns its Context and Accelerator.
/// </summary>
public sealed class IlgpuDevice : Device
{
    private readonly Context context;
    private readonly Accelerator accelerator;
    private readonly IlgpuKernelSet kernels;

    private IlgpuDevice(Context context, Accelerator accelerator, DeviceInfo info)
    {
        this.context = context;
        this.accelerator = accelerator;
        Info = info;
        kernels = new IlgpuKernelSet(accelerator, info.Spec);
    }

    public override DeviceInfo Info { get; }

    /// <summary>The matmul kernel to run; tests set it to cover both.</summary>
    internal MatMulAlgorithm MatMulAlgorithm { get; set; } = MatMulAlgorithm.Auto;

    /// <summary>The attention kernels to run; tests set it to cover both.</summary>
    internal AttentionAlgorithm AttentionAlgorithm { get; set; } = AttentionAlgorithm.Auto;

    /// <summary>
    /// Groups the tiled attention aims to launch before it splits the keys further: four per multiprocessor, so a
    /// decode step (few query rows over a long prefix) still fills the device. Tests lower it to force splits.
    /// </summary>
    internal int AttentionTargetGroups { get; set; }

    /// <summary>Whether the tiled matmul can run here (groups of Tile x Tile threads).</summary>
    internal bool SupportsTiledMatMul => accelerator.MaxNumThreadsPerGroup >= MatMulKernels.Tile * MatMulKernels.Tile;

    /// <summary>
    /// ILGPU's CPU simulator with groups of <paramref name="threadsPerWarp"/> x <paramref name="warpsPerGroup"/> threads.
    /// For checking kernels on tiny shapes only: it runs at well under 1 GFLOP/s.
    /// </summary>
    public static IlgpuDevice CreateCpuSimulator(int threadsPerWarp = 4, int warpsPerGroup = 64, int multiprocessors = 1)
    {
        var cpu = new CPUDevice(threadsPerWarp, warpsPerGroup, multiprocessors);
        var context = Context.Create(b => b.CPU(cpu).EnableAlgorithms().Optimize(OptimizationLevel.O1));
        try
        {
            var acc = context.GetCPUDevice(0).CreateCPUAccelerator(context);
            string spec = threadsPerWarp == 4 && warpsPerGroup == 64 && multiprocessors == 1
                ? "ilgpu-cpu"
                : $"ilgpu-cpu:{threadsPerWarp}x{warpsPerGroup}x{multiprocessors}";
            return new IlgpuDevice(context, acc, Describe(spec, DeviceKind.IlgpuCpu, acc, $"simulator, warp {threadsPerWarp}, {warpsPerGroup} warps per group"));
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>CUDA device <paramref name="index"/>.</summary>
    public static IlgpuDevice CreateCuda(int index = 0)
    {
        var context = Context.Create(b => b.Cuda().EnableAlgorithms().Optimize(OptimizationLevel.O2));
        try
        {
            var devices = context.GetCudaDevices();
            if (index < 0 || index >= devices.Count)
            {
                throw new ArgumentException($"cuda:{index} is not present ({devices.Count} CUDA devices found)");
            }

            var acc = context.CreateCudaAccelerator(index);
            return new IlgpuDevice(context, acc, Describe($"cuda:{index}", DeviceKind.Cuda, acc, "CUDA"));
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>OpenCL device <paramref name="index"/> (in ILGPU's order), with the PoCL workarounds of <see cref="OpenClSupport"/>.</summary>
    public static IlgpuDevice CreateOpenCl(int index = 0)
    {
        OpenClSupport.InstallLibraryResolver();
        // OpenCL(predicate) with an accept-all predicate: ILGPU's default OpenCL() drops devices without the generic
        // address space (PoCL among them) before we can force the capability on.
        var context = Context.Create(b => b.OpenCL(OpenClSupport.AcceptAll).EnableAlgorithms().Optimize(OptimizationLevel.O2));
        try
        {
            var devices = context.GetCLDevices();
            if (index < 0 || index >= devices.Count)
            {
                throw new ArgumentException($"opencl:{index} is not present ({devices.Count} OpenCL devices found)");
            }

            var device = devices[index];
            bool forced = OpenClSupport.ForceGenericAddressSpace(device);
            var acc = device.CreateCLAccelerator(context);
            string detail = $"OpenCL {device.DeviceVersion}, {device.DeviceType}, {device.PlatformName}" + (forced ? ", generic address space check bypassed" : "");
            return new IlgpuDevice(context, acc, Describe($"opencl:{index}", DeviceKind.OpenCL, acc, detail));
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    private static DeviceInfo Describe(string spec, DeviceKind kind, Accelerator acc, string detail) =>
        new(spec, kind, acc.Name.Trim(), acc.MemorySize, acc.WarpSize, acc.MaxNumThreadsPerGroup, detail);

    protected override void DisposeCore()
    {
        accelerator.Dispose();
        context.Dispose();
    }

    public override void Synchronize() => accelerator.Synchronize();

    private static ArrayView<float> V(Tensor t) => ((Buffer)t.Storage).View.SubView(t.Offset, t.Length);

    private static ArrayView<int> V(IndexTensor t) => ((IndexBuffer)t.Storage).View.SubView(0, t.Length);

    internal override object AllocateStorage(int length)
    {
        ThrowIfDisposed();
        var buffer = accelerator.Allocate1D<float>(Math.Max(1, length));
        buffer.MemSetToZero();
        return buffer;
    }

    internal override object AllocateIndexStorage(int[] values)
    {
        ThrowIfDisposed();
        var buffer = accelerator.Allocate1D<int>(Math.Max(1, values.Length));
        if (values.Length > 0) buffer.View.SubView(0, values.Length).CopyFromCPU(values);
        return buffer;
    }

    internal override void ReleaseStorage(object storage)
    {
        if (!IsDisposed) ((IDisposable)storage).Dispose();
    }

    internal override void Upload(Tensor t, ReadOnlySpan<float> source)
    {
        if (t.Length == 0) return;
        accelerator.Synchronize();
        V(t).CopyFromCPU(source);
    }

    internal override void Download(Tensor t, Span<float> destination)
    {
        if (t.Length == 0) return;
        accelerator.Synchronize();
        V(t).CopyToCPU(destination);
    }

    internal override void MatMulCore(Tensor a, Tensor b, Tensor c, MatMulShape s, float alpha, float beta)
    {
        if (c.Length == 0) return;
        var algorithm = MatMulAlgorithm;
        if (algorithm == MatMulAlgorithm.Auto)
        {
            algorithm = SupportsTiledMatMul && s.M >= MatMulKernels.Tile && s.N >= MatMulKernels.Tile ? MatMulAlgorithm.Tiled : MatMulAlgorithm.Naive;
        }

        if (algorithm == MatMulAlgorithm.Tiled)
        {
            if (!SupportsTiledMatMul)
            {
                throw new InvalidOperationException($"tiled matmul needs {MatMulKernels.Tile * MatMulKernels.Tile}-thread groups; {Info.Spec} allows {accelerator.MaxNumThreadsPerGroup}");
            }

            const int t = MatMulKernels.Tile;
            var config = new KernelConfig(new Index3D((s.N + t - 1) / t, (s.M + t - 1) / t, s.Batch), new Index3D(t, t, 1));
            kernels.MatMulTiled.Value(config, V(a), V(b), V(c), s, alpha, beta);
        }
        else
        {
            kernels.MatMulNaive.Value(c.Length, V(a), V(b), V(c), s, alpha, beta);
        }
    }

    internal override void AddCore(Tensor a, Tensor b, Tensor y)
    {
        if (y.Length > 0) kernels.Add.Value(y.Length, V(a), V(b), V(y));
    }

    internal override void MulCore(Tensor a, Tensor b, Tensor y)
    {
        if (y.Length > 0) kernels.Mul.Value(y.Length, V(a), V(b), V(y));
    }

    internal override void ScaleColumnsCore(Tensor x, Tensor c, Tensor y, int cols) => kernels.ScaleColumns.Value(x.Length, V(x), V(c), V(y), cols);

    internal override void ScaleCore(Tensor x, float s, Tensor y)
    {
        if (y.Length > 0) kernels.Scale.Value(y.Length, V(x), s, V(y));
    }

    internal override void AxpyCore(float alpha, Tensor x, Tensor y)
    {
        if (y.Length > 0) kernels.Axpy.Value(y.Length, alpha, V(x), V(y));
    }

    internal override void FillCore(Tensor y, float value)
    {
        if (y.Length > 0) kernels.Fill.Value(y.Length, V(y), value);
    }

    internal override void CopyCore(Tensor source, Tensor destination)
    {
        if (source.Length > 0) V(source).CopyTo(V(destination));
    }

    internal override void TanhCore(Tensor x, Tensor y) => kernels.Tanh.Value(x.Length, V(x), V(y));

    internal override void TanhBackwardCore(Tensor y, Tensor dy, Tensor dx) => kernels.TanhBackward.Value(y.Length, V(y), V(dy), V(dx));

    internal override void SiluCore(Tensor x, Tensor y)
    {
        if (y.Length > 0) kernels.Silu.Value(y.Length, V(x), V(y));
    }

    internal override void SiluBackwardCore(Tensor x, Tensor dy, Tensor dx)
    {
        if (dx.Length > 0) kernels.SiluBackward.Value(dx.Length, V(x), V(dy), V(dx));
    }

    internal override void SwiGluCore(Tensor gate, Tensor up, Tensor y)
    {
        if (y.Length > 0) kernels.SwiGlu.Value(y.Length, V(gate), V(up), V(y));
    }

    internal override void SwiGluBackwardCore(Tensor gate, Tensor up, Tensor dy, Tensor dGate, Tensor dUp)
    {
        if (dy.Length > 0) kernels.SwiGluBackward.Value(dy.Length, V(gate), V(up), V(dy), V(dGate), V(dUp));
    }

    internal override void SoftmaxCore(Tensor x, Tensor y, int rows, int cols)
    {
        if (rows > 0 && cols > 0) kernels.Softmax.Value(rows, V(x), V(y), cols);
    }

    internal override void SoftmaxBackwardCore(Tensor y, Tensor dy, Tensor dx, int rows, int cols)
    {
        if (rows > 0 && cols > 0) kernels.SoftmaxBackward.Value(rows, V(y), V(dy), V(dx), cols);
    }

    internal override void RmsNormCore(Tensor x, Tensor w, Tensor y, Tensor rstd, int rows, int dim, float eps)
    {
        if (rows > 0) kernels.RmsNorm.Value(rows, V(x), V(w), V(y), V(rstd), dim, eps);
    }

    internal override void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor dx, Tensor dw, int rows, int dim)
    {
        if (rows > 0) kernels.RmsNormBackwardInput.Value(rows, V(dy), V(x), V(w), V(rstd), V(dx), dim);
        if (dim > 0) kernels.RmsNormBackwardWeight.Value(dim, V(dy), V(x), V(rstd), V(dw), rows, dim);
    }

    internal override void RopeCore(Tensor x, IndexTensor positions, Tensor y, int tokens, int heads, int dim, float theta, bool inverse, RopeScaling scaling)
    {
        int n = tokens * heads * (dim / 2);
        if (n > 0) kernels.Rope.Value(n, V(x), V(positions), V(y), heads, dim, MathF.Log(theta), inverse ? -1f : 1f, scaling);
    }

    internal override void AttentionCore(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, AttentionShape s)
    {
        int rows = s.B * s.H * s.Tq;
        if (rows == 0) return;
        if (!UseTiledAttention(s))
        {
            kernels.Attention.Value(rows, V(q), V(k), V(v), V(o), V(lse), s);
            return;
        }

        // Split the keys while the (row block, b, hk) groups alone would leave the device idle, keeping at least four
        // key tiles per split (fewer splits than that would mostly add merge work).
        const int rowsPerGroup = TiledAttentionKernels.Rows, keysPerTile = TiledAttentionKernels.Keys;
        int rowBlocks = TiledRowBlocks(s);
        int groups = rowBlocks * s.B * s.Hkv;
        int target = AttentionTargetGroups > 0 ? AttentionTargetGroups : 4 * Math.Max(1, accelerator.NumMultiprocessors);
        int maxSplits = Math.Max(1, s.Tk / (4 * keysPerTile));
        int splits = Math.Clamp((target + groups - 1) / groups, 1, maxSplits);
        int chunk = Math.Max(keysPerTile, ((s.Tk + splits - 1) / splits + keysPerTile - 1) / keysPerTile * keysPerTile);
        splits = Math.Max(1, (s.Tk + chunk - 1) / chunk);
        var config = new KernelConfig(new Index3D(rowBlocks, s.B * s.Hkv, splits), new Index3D(rowsPerGroup, 1, 1));
        if (splits == 1)
        {
            kernels.AttentionTiled.Value(config, V(q), V(k), V(v), V(o), V(lse), V(o), V(lse), s, chunk);
            return;
        }

        using var partialO = accelerator.Allocate1D<float>((long)splits * rows * s.D);
        using var partialLse = accelerator.Allocate1D<float>((long)splits * rows);
        kernels.AttentionTiled.Value(config, V(q), V(k), V(v), V(o), V(lse), partialO.View, partialLse.View, s, chunk);
        kernels.AttentionMergeSplits.Value(rows, partialO.View, partialLse.View, V(o), V(lse), rows, splits, s.D);
        accelerator.Synchronize(); // the partials are freed on return
    }

    internal override void AttentionBackwardCore(
        Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dO, Tensor dq, Tensor dk, Tensor dv, AttentionShape s)
    {
        int rows = s.B * s.H * s.Tq;
        int keyRows = s.B * s.Tk * s.Hkv;
        bool tiled = UseTiledAttention(s);
        const int group = TiledAttentionKernels.Rows;
        using var delta = accelerator.Allocate1D<float>(Math.Max(1, rows));
        if (rows > 0)
        {
            kernels.AttentionDelta.Value(rows, V(o), V(dO), delta.View, s);
            if (tiled)
            {
                var config = new KernelConfig(new Index3D(TiledRowBlocks(s), s.B * s.Hkv, 1), new Index3D(group, 1, 1));
                kernels.AttentionBackwardQueryTiled.Value(config, V(q), V(k), V(v), V(lse), delta.View, V(dO), V(dq), s);
            }
            else
            {
                kernels.AttentionBackwardQuery.Value(rows, V(q), V(k), V(v), V(lse), delta.View, V(dO), V(dq), s);
            }
        }

        if (keyRows > 0)
        {
            if (tiled)
            {
                var config = new KernelConfig(new Index3D((s.Tk + group - 1) / group, s.B * s.Hkv, 1), new Index3D(group, 1, 1));
                kernels.AttentionBackwardKeyValueTiled.Value(config, V(q), V(k), V(v), V(lse), delta.View, V(dO), V(dk), V(dv), s);
            }
            else
            {
                kernels.AttentionBackwardKeyValue.Value(keyRows, V(q), V(k), V(v), V(lse), delta.View, V(dO), V(dk), V(dv), s);
            }
        }

        accelerator.Synchronize(); // delta is freed on return
    }

    /// <summary>Groups of <see cref="TiledAttentionKernels.Rows"/> that the Tq G query rows of one (b, hk) fill.</summary>
    private static int TiledRowBlocks(AttentionShape s) => (s.Tq * s.Group + TiledAttentionKernels.Rows - 1) / TiledAttentionKernels.Rows;

    /// <summary>Whether attention runs the tiled kernels: <see cref="AttentionAlgorithm"/>, Auto taking them where they fit.</summary>
    private bool UseTiledAttention(AttentionShape s)
    {
        bool fits = s.D <= TiledAttentionKernels.MaxD && accelerator.MaxNumThreadsPerGroup >= TiledAttentionKernels.Rows
            && accelerator.MaxSharedMemoryPerGroup >= TiledAttentionKernels.SharedBytes;
        if (AttentionAlgorithm == AttentionAlgorithm.PerRow) return false;
        if (AttentionAlgorithm == AttentionAlgorithm.Tiled && !fits)
        {
            throw new InvalidOperationException(
                $"tiled attention needs D <= {TiledAttentionKernels.MaxD} (got {s.D}), {TiledAttentionKernels.Rows}-thread groups and {TiledAttentionKernels.SharedBytes} bytes of shared " +
                    $"memory per group ({Info.Spec} allows {accelerator.MaxNumThreadsPerGroup} threads and {accelerator.MaxSharedMemoryPerGroup} bytes)");
        }

        return fits;
    }

    internal override void EmbeddingCore(IndexTensor ids, Tensor table, Tensor y, int dim)
    {
        if (y.Length > 0) kernels.Embedding.Value(y.Length, V(ids), V(table), V(y), dim);
    }

    internal override void EmbeddingBackwardCore(IndexTensor ids, Tensor dy, Tensor dtable, int dim)
    {
        FillCore(dtable, 0f);
        if (ids.Length == 0 || dim == 0) return;
        var (used, offsets, order) = EmbeddingPlan.Build(ids.Host, dtable.Dim(0));
        using var usedBuf = accelerator.Allocate1D(used);
        using var offsetBuf = accelerator.Allocate1D(offsets);
        using var orderBuf = accelerator.Allocate1D(order);
        kernels.EmbeddingBackward.Value(used.Length * dim, usedBuf.View, offsetBuf.View, orderBuf.View, V(dy), V(dtable), dim);
        accelerator.Synchronize();
    }

    internal override void CrossEntropyCore(Tensor logits, IndexTensor targets, Tensor losses, int vocab, int ignoreIndex)
    {
        int rows = targets.Length;
        if (rows == 0) return;
        using var lse = accelerator.Allocate1D<float>(rows);
        kernels.LogSumExp.Value(rows, V(logits), lse.View, vocab);
        kernels.CrossEntropyLoss.Value(rows, V(logits), V(targets), lse.View, V(losses), vocab, ignoreIndex);
        accelerator.Synchronize();
    }

    internal override void CrossEntropyBackwardCore(Tensor logits, IndexTensor targets, Tensor dlogits, int vocab, int ignoreIndex, float scale)
    {
        int rows = targets.Length;
        if (rows == 0 || vocab == 0) return;
        using var lse = accelerator.Allocate1D<float>(rows);
        kernels.LogSumExp.Value(rows, V(logits), lse.View, vocab);
        kernels.CrossEntropyBackward.Value(rows * vocab, V(logits), V(targets), lse.View, V(dlogits), vocab, ignoreIndex, scale);
        accelerator.Synchronize();
    }

    internal override void AdamWCore(Tensor p, Tensor g, Tensor m, Tensor v, AdamWStep step)
    {
        if (p.Length == 0) return;
        kernels.AdamW.Value(
            p.Length, V(p), V(g), V(m), V(v), step.LearningRate, step.Beta1, step.Beta2, step.Epsilon, step.WeightDecay,
            step.BiasCorrection1, step.BiasCorrection2);
    }

    internal override void SgdCore(Tensor p, Tensor g, Tensor? momentum, SgdStep step)
    {
        if (p.Length == 0) return;
        var buf = momentum != null ? V(momentum) : V(g); // not read when momentum is 0
        kernels.Sgd.Value(p.Length, V(p), V(g), buf, step.LearningRate, step.Momentum, step.WeightDecay, step.Nesterov ? 1 : 0);
    }

    internal override void LoraMixedCore(Tensor x, Tensor y, LoraAdapterPool pool, IndexTensor rowAdapters, LoraBatchShape s)
    {
        using var t = accelerator.Allocate1D<float>(Math.Max(1, s.M * s.RMax));
        kernels.LoraShrink.Value(s.M * s.RMax, V(x), V(pool.APool), V(pool.AOffsets), V(pool.Ranks), V(rowAdapters), t.View, s);
        if (s.N > 0) kernels.LoraExpand.Value(s.M * s.N, t.View, V(pool.BPool), V(pool.BOffsets), V(pool.Ranks), V(pool.Scales), V(rowAdapters), V(y), s);
        accelerator.Synchronize(); // t is freed on return
    }

    internal override void DoraScaleCore(Tensor y, Tensor scales, IndexTensor rowSlots, int n) =>
        kernels.DoraScale.Value(y.Length, V(y), V(scales), V(rowSlots), n);

    internal override void LoraMixedBackwardCore(Tensor x, Tensor dy, LoraAdapterPool pool, IndexTensor rowAdapters, Tensor? dx, Tensor da, Tensor db, LoraBatchShape s)
    {
        using var t = accelerator.Allocate1D<float>(Math.Max(1, s.M * s.RMax));
        using var dt = accelerator.Allocate1D<float>(Math.Max(1, s.M * s.RMax));
        kernels.LoraShrink.Value(s.M * s.RMax, V(x), V(pool.APool), V(pool.AOffsets), V(pool.Ranks), V(rowAdapters), t.View, s);
        kernels.LoraDt.Value(s.M * s.RMax, V(dy), V(pool.BPool), V(pool.BOffsets), V(pool.Ranks), V(pool.Scales), V(rowAdapters), dt.View, s);
        if (db.Length > 0) kernels.LoraGradB.Value(db.Length, V(dy), t.View, V(pool.BOffsets), V(pool.Ranks), V(pool.Scales), V(rowAdapters), V(db), pool.Count, s);
        if (da.Length > 0) kernels.LoraGradA.Value(da.Length, V(x), dt.View, V(pool.AOffsets), V(rowAdapters), V(da), pool.Count, s);
        if (dx != null && s.K > 0) kernels.LoraGradX.Value(s.M * s.K, dt.View, V(pool.APool), V(pool.AOffsets), V(pool.Ranks), V(rowAdapters), V(dx), s);
        accelerator.Synchronize(); // t and dt are freed on return
    }

    internal override void MaskedAdamWCore(Tensor p, Tensor g, IndexTensor idx, Tensor m, Tensor v, AdamWStep step) =>
        kernels.MaskedAdamW.Value(idx.Length, V(p), V(g), V(idx), V(m), V(v), step.LearningRate, step.Beta1, step.Beta2, step.Epsilon, step.WeightDecay,
            step.BiasCorrection1, step.BiasCorrection2);

    internal override void MaskedSgdCore(Tensor p, Tensor g, IndexTensor idx, Tensor? momentum, SgdStep step) =>
        kernels.MaskedSgd.Value(idx.Length, V(p), V(g), V(idx), momentum != null ? V(momentum) : V(g), step.LearningRate, step.Momentum, step.WeightDecay);

    internal override void ScatterAddCore(Tensor w, IndexTensor idx, Tensor values, float alpha) =>
        kernels.ScatterAdd.Value(idx.Length, V(w), V(idx), V(values), alpha);

    internal override void ScatterCore(Tensor w, IndexTensor idx, Tensor values) => kernels.Scatter.Value(idx.Length, V(w), V(idx), V(values));

    internal override void GatherCore(Tensor w, IndexTensor idx, Tensor values) => kernels.Gather.Value(idx.Length, V(w), V(idx), V(values));

    internal override void DareCore(Tensor x, Tensor y, float p, int seed) => kernels.Dare.Value(x.Length, V(x), V(y), p, seed);

    internal override void AbsAddCore(Tensor x, Tensor acc) => kernels.AbsAdd.Value(x.Length, V(x), V(acc));

    internal override int[] SelectHistogramCore(Tensor x, SelectScore score, uint prefix, uint prefixMask, int shift, int chunk)
    {
        int chunks = (x.Length + chunk - 1) / chunk;
        using var hist = accelerator.Allocate1D<int>(chunks * SelectKernels.Bins);
        using var total = accelerator.Allocate1D<int>(SelectKernels.Bins);
        kernels.SelectHistogram.Value(chunks, V(x), hist.View, score, prefix, prefixMask, shift, chunk, x.Length);
        kernels.SelectHistogramSum.Value(SelectKernels.Bins, hist.View, total.View, chunks);
        var result = new int[SelectKernels.Bins];
        accelerator.Synchronize();
        total.View.CopyToCPU(result);
        return result;
    }

    internal override int[] SelectWriteCore(Tensor x, SelectScore score, SelectBand band, int count)
    {
        int chunks = (band.Length + band.Chunk - 1) / band.Chunk;
        using var counts = accelerator.Allocate1D<int>(3 * chunks);
        kernels.SelectCount.Value(chunks, V(x), counts.View, score, band);
        var host = new int[3 * chunks];
        accelerator.Synchronize();
        counts.View.CopyToCPU(host);
        var before = SelectPlan.Before(host, band, count);
        using var beforeBuf = accelerator.Allocate1D(before);
        using var output = accelerator.Allocate1D<int>(count);
        kernels.SelectWrite.Value(chunks, V(x), beforeBuf.View, output.View, score, band);
        var result = new int[count];
        accelerator.Synchronize();
        output.View.CopyToCPU(result);
        return result;
    }

    internal override void SparseDeltaMixedCore(Tensor x, Tensor y, SparseDeltaPool pool, IndexTensor rowVariants, int rows) =>
        kernels.SparseMixed.Value(rows * pool.OutFeatures, V(x), V(pool.RowStart), V(pool.Cols), V(pool.Vals), V(rowVariants), V(y), pool.OutFeatures, pool.InFeatures);

    internal override void AttentionMergeCore(Tensor o1, Tensor lse1, Tensor o2, Tensor lse2, Tensor o, Tensor lse, int rows, int d) =>
        kernels.AttentionMerge.Value(rows, V(o1), V(lse1), V(o2), V(lse2), V(o), V(lse), d);

    internal override void BitDeltaMixedCore(Tensor x, Tensor y, BitDeltaPool pool, IndexTensor rowVariants, BitDeltaShape s) =>
        kernels.BitDeltaMixed.Value(s.M * s.N, V(x), V(pool.Signs), V(pool.Scales), V(pool.First), V(pool.Rounds), V(rowVariants), V(y), s);

    internal override void BitDeltaDecodeCore(BitDeltaPool pool, int slot, Tensor dense, float alpha, float beta, BitDeltaShape s)
    {
        var words = V(pool.Signs).SubView((long)slot * s.N * s.W, (long)s.N * s.W);
        kernels.BitDeltaDecode.Value(s.N * s.K, words, V(dense), alpha, beta, s);
    }

    internal override double SumCore(Tensor x, bool squares)
    {
        if (x.Length == 0) return 0;
        int chunks = (x.Length + ElementwiseKernels.ReduceChunk - 1) / ElementwiseKernels.ReduceChunk;
        using var partial = accelerator.Allocate1D<float>(chunks);
        kernels.PartialSum.Value(chunks, V(x), partial.View, squares ? 1 : 0);
        accelerator.Synchronize();
        var host = partial.GetAsArray1D();
        double acc = 0;
        foreach (float v in host) acc += v;
        return acc;
    }
}
