using ILGPU;
using ILGPU.Runtime;
using PeftSharp.Kernels.Attention;
using PeftSharp.Kernels.BitDelta;
using PeftSharp.Kernels.Core;
using PeftSharp.Kernels.Lora;
using PeftSharp.Kernels.Optim;
using PeftSharp.Kernels.Sparse;
using AV = ILGPU.ArrayView<float>;
using AVI = ILGPU.ArrayView<int>;

namespace PeftSharp.Engine.Ilgpu;

/// <summary>
/// Every kernel, loaded (compiled) once per accelerator on first use. A compile failure names the kernel and the
/// device; ILGPU 1.5.3 leaves the context unusable after one, so the device must then be recreated.
/// </summary>
internal sealed class IlgpuKernelSet
{
    private readonly Accelerator acc;
    private readonly string deviceName;

    public IlgpuKernelSet(Accelerator accelerator, string deviceName)
    {
        acc = accelerator;
        this.deviceName = deviceName;
        MatMulNaive = Load<Action<Index1D, AV, AV, AV, MatMulShape, float, float>>(nameof(MatMulKernels.NaiveKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, MatMulShape,
            float, float>(MatMulKernels.NaiveKernel));
        MatMulTiled = Load<Action<KernelConfig, AV, AV, AV, MatMulShape, float, float>>(nameof(MatMulKernels.TiledKernel), () => acc.LoadStreamKernel<AV, AV, AV, MatMulShape, float,
            float>(MatMulKernels.TiledKernel));
        Add = Load<Action<Index1D, AV, AV, AV>>(nameof(ElementwiseKernels.AddKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV>(ElementwiseKernels.AddKernel));
        Mul = Load<Action<Index1D, AV, AV, AV>>(nameof(ElementwiseKernels.MulKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV>(ElementwiseKernels.MulKernel));
        Scale = Load<Action<Index1D, AV, float, AV>>(nameof(ElementwiseKernels.ScaleKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, float, AV>(ElementwiseKernels.ScaleKernel));
        ScaleColumns = Load<Action<Index1D, AV, AV, AV, int>>(nameof(ElementwiseKernels.ScaleColumnsKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV,
            int>(ElementwiseKernels.ScaleColumnsKernel));
        Axpy = Load<Action<Index1D, float, AV, AV>>(nameof(ElementwiseKernels.AxpyKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, float, AV, AV>(ElementwiseKernels.AxpyKernel));
        Fill = Load<Action<Index1D, AV, float>>(nameof(ElementwiseKernels.FillKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, float>(ElementwiseKernels.FillKernel));
        Tanh = Load<Action<Index1D, AV, AV>>(nameof(ElementwiseKernels.TanhKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV>(ElementwiseKernels.TanhKernel));
        TanhBackward = Load<Action<Index1D, AV, AV, AV>>(nameof(ElementwiseKernels.TanhBackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV,
            AV>(ElementwiseKernels.TanhBackwardKernel));
        Silu = Load<Action<Index1D, AV, AV>>(nameof(ElementwiseKernels.SiluKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV>(ElementwiseKernels.SiluKernel));
        SiluBackward = Load<Action<Index1D, AV, AV, AV>>(nameof(ElementwiseKernels.SiluBackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV,
            AV>(ElementwiseKernels.SiluBackwardKernel));
        SwiGlu = Load<Action<Index1D, AV, AV, AV>>(nameof(ElementwiseKernels.SwiGluKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV>(ElementwiseKernels.SwiGluKernel));
        SwiGluBackward = Load<Action<Index1D, AV, AV, AV, AV, AV>>(nameof(ElementwiseKernels.SwiGluBackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV,
            AV>(ElementwiseKernels.SwiGluBackwardKernel));
        PartialSum = Load<Action<Index1D, AV, AV, int>>(nameof(ElementwiseKernels.PartialSumKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, int>(ElementwiseKernels.PartialSumKernel));
        Softmax = Load<Action<Index1D, AV, AV, int>>(nameof(SoftmaxKernels.ForwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, int>(SoftmaxKernels.ForwardKernel));
        SoftmaxBackward = Load<Action<Index1D, AV, AV, AV, int>>(nameof(SoftmaxKernels.BackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, int>(SoftmaxKernels.BackwardKernel));
        RmsNorm = Load<Action<Index1D, AV, AV, AV, AV, int, float>>(nameof(RmsNormKernels.ForwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, int,
            float>(RmsNormKernels.ForwardKernel));
        RmsNormBackwardInput = Load<Action<Index1D, AV, AV, AV, AV, AV, int>>(nameof(RmsNormKernels.BackwardInputKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, AV,
            int>(RmsNormKernels.BackwardInputKernel));
        RmsNormBackwardWeight = Load<Action<Index1D, AV, AV, AV, AV, int, int>>(nameof(RmsNormKernels.BackwardWeightKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV,
            int, int>(RmsNormKernels.BackwardWeightKernel));
        Rope = Load<Action<Index1D, AV, AVI, AV, int, int, float, float, RopeScaling>>(nameof(RopeKernels.ForwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV, int,
            int, float, float, RopeScaling>(RopeKernels.ForwardKernel));
        Attention = Load<Action<Index1D, AV, AV, AV, AV, AV, AttentionShape>>(nameof(AttentionKernels.ForwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, AV,
            AttentionShape>(AttentionKernels.ForwardKernel));
        AttentionTiled = Load<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AttentionShape, int>>(nameof(TiledAttentionKernels.ForwardKernel), () => acc.LoadStreamKernel<AV, AV, AV, AV,
            AV, AV, AV, AttentionShape, int>(TiledAttentionKernels.ForwardKernel));
        AttentionMergeSplits = Load<Action<Index1D, AV, AV, AV, AV, int, int, int>>(nameof(TiledAttentionKernels.MergeSplitsKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV,
            AV, AV, int, int, int>(TiledAttentionKernels.MergeSplitsKernel));
        AttentionBackwardQueryTiled = Load<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AttentionShape>>(nameof(TiledAttentionKernels.BackwardQueryKernel), () => acc.LoadStreamKernel<AV,
            AV, AV, AV, AV, AV, AV, AttentionShape>(TiledAttentionKernels.BackwardQueryKernel));
        AttentionBackwardKeyValueTiled = Load<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>>(nameof(TiledAttentionKernels.BackwardKeyValueKernel), () =>
            acc.LoadStreamKernel<AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>(TiledAttentionKernels.BackwardKeyValueKernel));
        AttentionDelta = Load<Action<Index1D, AV, AV, AV, AttentionShape>>(nameof(AttentionKernels.DeltaKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV,
            AttentionShape>(AttentionKernels.DeltaKernel));
        AttentionBackwardQuery = Load<Action<Index1D, AV, AV, AV, AV, AV, AV, AV, AttentionShape>>(nameof(AttentionKernels.BackwardQueryKernel), () =>
            acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, AV, AV, AV, AttentionShape>(AttentionKernels.BackwardQueryKernel));
        AttentionBackwardKeyValue = Load<Action<Index1D, AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>>(nameof(AttentionKernels.BackwardKeyValueKernel), () =>
            acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>(AttentionKernels.BackwardKeyValueKernel));
        Embedding = Load<Action<Index1D, AVI, AV, AV, int>>(nameof(EmbeddingKernels.ForwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AVI, AV, AV, int>(EmbeddingKernels.ForwardKernel));
        EmbeddingBackward = Load<Action<Index1D, AVI, AVI, AVI, AV, AV, int>>(nameof(EmbeddingKernels.BackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AVI, AVI, AVI, AV, AV,
            int>(EmbeddingKernels.BackwardKernel));
        LogSumExp = Load<Action<Index1D, AV, AV, int>>(nameof(CrossEntropyKernels.LogSumExpKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, int>(CrossEntropyKernels.LogSumExpKernel));
        CrossEntropyLoss = Load<Action<Index1D, AV, AVI, AV, AV, int, int>>(nameof(CrossEntropyKernels.LossKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV, AV, int,
            int>(CrossEntropyKernels.LossKernel));
        CrossEntropyBackward = Load<Action<Index1D, AV, AVI, AV, AV, int, int, float>>(nameof(CrossEntropyKernels.BackwardKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV,
            AV, int, int, float>(CrossEntropyKernels.BackwardKernel));
        AdamW = Load<Action<Index1D, AV, AV, AV, AV, float, float, float, float, float, float, float>>(nameof(OptimizerKernels.AdamWKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D,
            AV, AV, AV, AV, float, float, float, float, float, float, float>(OptimizerKernels.AdamWKernel));
        LoraShrink = Load<Action<Index1D, AV, AV, AVI, AVI, AVI, AV, LoraBatchShape>>(nameof(LoraKernels.ShrinkKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AVI, AVI,
            AV, LoraBatchShape>(LoraKernels.ShrinkKernel));
        LoraExpand = Load<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, LoraBatchShape>>(nameof(LoraKernels.ExpandKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AVI,
            AV, AVI, AV, LoraBatchShape>(LoraKernels.ExpandKernel));
        MaskedAdamW = Load<Action<Index1D, AV, AV, AVI, AV, AV, float, float, float, float, float, float, float>>(nameof(SparseKernels.MaskedAdamWKernel), () =>
            acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AV, AV, float, float, float, float, float, float, float>(SparseKernels.MaskedAdamWKernel));
        MaskedSgd = Load<Action<Index1D, AV, AV, AVI, AV, float, float, float>>(nameof(SparseKernels.MaskedSgdKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AV, float,
            float, float>(SparseKernels.MaskedSgdKernel));
        ScatterAdd = Load<Action<Index1D, AV, AVI, AV, float>>(nameof(SparseKernels.ScatterAddKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV,
            float>(SparseKernels.ScatterAddKernel));
        Scatter = Load<Action<Index1D, AV, AVI, AV>>(nameof(SparseKernels.ScatterKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV>(SparseKernels.ScatterKernel));
        Gather = Load<Action<Index1D, AV, AVI, AV>>(nameof(SparseKernels.GatherKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV>(SparseKernels.GatherKernel));
        AbsAdd = Load<Action<Index1D, AV, AV>>(nameof(ElementwiseKernels.AbsAddKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV>(ElementwiseKernels.AbsAddKernel));
        SelectHistogram = Load<Action<Index1D, AV, AVI, SelectScore, uint, uint, int, int, int>>(nameof(SelectKernels.HistogramKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV,
            AVI, SelectScore, uint, uint, int, int, int>(SelectKernels.HistogramKernel));
        SelectHistogramSum = Load<Action<Index1D, AVI, AVI, int>>(nameof(SelectKernels.HistogramSumKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AVI, AVI,
            int>(SelectKernels.HistogramSumKernel));
        SelectCount = Load<Action<Index1D, AV, AVI, SelectScore, SelectBand>>(nameof(SelectKernels.CountKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, SelectScore,
            SelectBand>(SelectKernels.CountKernel));
        SelectWrite = Load<Action<Index1D, AV, AVI, AVI, SelectScore, SelectBand>>(nameof(SelectKernels.WriteKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AVI,
            SelectScore, SelectBand>(SelectKernels.WriteKernel));
        Dare = Load<Action<Index1D, AV, AV, float, int>>(nameof(SparseKernels.DareKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, float, int>(SparseKernels.DareKernel));
        SparseMixed = Load<Action<Index1D, AV, AVI, AVI, AV, AVI, AV, int, int>>(nameof(SparseKernels.MixedKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AVI, AV, AVI, AV,
            int, int>(SparseKernels.MixedKernel));
        DoraScale = Load<Action<Index1D, AV, AV, AVI, int>>(nameof(LoraKernels.DoraScaleKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, int>(LoraKernels.DoraScaleKernel));
        LoraDt = Load<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, LoraBatchShape>>(nameof(LoraKernels.DtKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AVI, AV, AVI,
            AV, LoraBatchShape>(LoraKernels.DtKernel));
        LoraGradB = Load<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, int, LoraBatchShape>>(nameof(LoraKernels.GradBKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI,
            AVI, AV, AVI, AV, int, LoraBatchShape>(LoraKernels.GradBKernel));
        LoraGradA = Load<Action<Index1D, AV, AV, AVI, AVI, AV, int, LoraBatchShape>>(nameof(LoraKernels.GradAKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AVI, AV,
            int, LoraBatchShape>(LoraKernels.GradAKernel));
        LoraGradX = Load<Action<Index1D, AV, AV, AVI, AVI, AVI, AV, LoraBatchShape>>(nameof(LoraKernels.GradXKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AVI, AVI, AVI,
            AV, LoraBatchShape>(LoraKernels.GradXKernel));
        AttentionMerge = Load<Action<Index1D, AV, AV, AV, AV, AV, AV, int>>(nameof(AttentionMergeKernels.MergeKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, AV, AV, AV,
            int>(AttentionMergeKernels.MergeKernel));
        BitDeltaMixed = Load<Action<Index1D, AV, AVI, AV, AVI, AVI, AVI, AV, BitDeltaShape>>(nameof(BitDeltaKernels.MixedKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AVI, AV,
            AVI, AVI, AVI, AV, BitDeltaShape>(BitDeltaKernels.MixedKernel));
        BitDeltaDecode = Load<Action<Index1D, AVI, AV, float, float, BitDeltaShape>>(nameof(BitDeltaKernels.DecodeKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AVI, AV, float,
            float, BitDeltaShape>(BitDeltaKernels.DecodeKernel));
        Sgd = Load<Action<Index1D, AV, AV, AV, float, float, float, int>>(nameof(OptimizerKernels.SgdKernel), () => acc.LoadAutoGroupedStreamKernel<Index1D, AV, AV, AV, float, float, float,
            int>(OptimizerKernels.SgdKernel));
    }

    public Lazy<Action<Index1D, AV, AV, AV, MatMulShape, float, float>> MatMulNaive { get; }
    public Lazy<Action<KernelConfig, AV, AV, AV, MatMulShape, float, float>> MatMulTiled { get; }
    public Lazy<Action<Index1D, AV, AV, AV>> Add { get; }
    public Lazy<Action<Index1D, AV, AV, AV>> Mul { get; }
    public Lazy<Action<Index1D, AV, float, AV>> Scale { get; }
    public Lazy<Action<Index1D, AV, AV, AV, int>> ScaleColumns { get; }
    public Lazy<Action<Index1D, float, AV, AV>> Axpy { get; }
    public Lazy<Action<Index1D, AV, float>> Fill { get; }
    public Lazy<Action<Index1D, AV, AV>> Silu { get; }
    public Lazy<Action<Index1D, AV, AV>> Tanh { get; }
    public Lazy<Action<Index1D, AV, AV, AV>> TanhBackward { get; }
    public Lazy<Action<Index1D, AV, AV, AV>> SiluBackward { get; }
    public Lazy<Action<Index1D, AV, AV, AV>> SwiGlu { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV>> SwiGluBackward { get; }
    public Lazy<Action<Index1D, AV, AV, int>> PartialSum { get; }
    public Lazy<Action<Index1D, AV, AV, int>> Softmax { get; }
    public Lazy<Action<Index1D, AV, AV, AV, int>> SoftmaxBackward { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, int, float>> RmsNorm { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV, int>> RmsNormBackwardInput { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, int, int>> RmsNormBackwardWeight { get; }
    public Lazy<Action<Index1D, AV, AVI, AV, int, int, float, float, RopeScaling>> Rope { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV, AttentionShape>> Attention { get; }
    public Lazy<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AttentionShape, int>> AttentionTiled { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, int, int, int>> AttentionMergeSplits { get; }
    public Lazy<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AttentionShape>> AttentionBackwardQueryTiled { get; }
    public Lazy<Action<KernelConfig, AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>> AttentionBackwardKeyValueTiled { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AttentionShape>> AttentionDelta { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV, AV, AV, AttentionShape>> AttentionBackwardQuery { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV, AV, AV, AV, AttentionShape>> AttentionBackwardKeyValue { get; }
    public Lazy<Action<Index1D, AVI, AV, AV, int>> Embedding { get; }
    public Lazy<Action<Index1D, AVI, AVI, AVI, AV, AV, int>> EmbeddingBackward { get; }
    public Lazy<Action<Index1D, AV, AV, int>> LogSumExp { get; }
    public Lazy<Action<Index1D, AV, AVI, AV, AV, int, int>> CrossEntropyLoss { get; }
    public Lazy<Action<Index1D, AV, AVI, AV, AV, int, int, float>> CrossEntropyBackward { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, float, float, float, float, float, float, float>> AdamW { get; }
    public Lazy<Action<Index1D, AV, AV, AV, float, float, float, int>> Sgd { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AVI, AV, LoraBatchShape>> LoraShrink { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, LoraBatchShape>> LoraExpand { get; }
    public Lazy<Action<Index1D, AV, AVI, AV, AVI, AVI, AVI, AV, BitDeltaShape>> BitDeltaMixed { get; }
    public Lazy<Action<Index1D, AV, AV, AV, AV, AV, AV, int>> AttentionMerge { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, LoraBatchShape>> LoraDt { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, int>> DoraScale { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AV, AVI, AV, int, LoraBatchShape>> LoraGradB { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AV, int, LoraBatchShape>> LoraGradA { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AVI, AVI, AV, LoraBatchShape>> LoraGradX { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AV, AV, float, float, float, float, float, float, float>> MaskedAdamW { get; }
    public Lazy<Action<Index1D, AV, AV, AVI, AV, float, float, float>> MaskedSgd { get; }
    public Lazy<Action<Index1D, AV, AVI, AV, float>> ScatterAdd { get; }
    public Lazy<Action<Index1D, AV, AVI, AV>> Gather { get; }
    public Lazy<Action<Index1D, AV, AVI, AV>> Scatter { get; }
    public Lazy<Action<Index1D, AV, AV, float, int>> Dare { get; }
    public Lazy<Action<Index1D, AV, AV>> AbsAdd { get; }
    public Lazy<Action<Index1D, AV, AVI, SelectScore, uint, uint, int, int, int>> SelectHistogram { get; }
    public Lazy<Action<Index1D, AVI, AVI, int>> SelectHistogramSum { get; }
    public Lazy<Action<Index1D, AV, AVI, SelectScore, SelectBand>> SelectCount { get; }
    public Lazy<Action<Index1D, AV, AVI, AVI, SelectScore, SelectBand>> SelectWrite { get; }
    public Lazy<Action<Index1D, AV, AVI, AVI, AV, AVI, AV, int, int>> SparseMixed { get; }
    public Lazy<Action<Index1D, AVI, AV, float, float, BitDeltaShape>> BitDeltaDecode { get; }

    private Lazy<T> Load<T>(string kernel, Func<T> load) => new(() =>
    {
        try
        {
            return load();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new InvalidOperationException(
                $"kernel {kernel} failed to compile on {deviceName}: {e.Message}. ILGPU cannot load further kernels in this context; dispose this device and open a new one (set " +
                    $"POCL_DEBUG=err to see OpenCL build logs).", e);
        }
    });
}
