namespace PeftSharp.Kernels.Optim;

/// <summary>Hyper-parameters of one SGD step (PyTorch semantics, no dampening).</summary>
public readonly record struct SgdStep(float LearningRate, float Momentum, float WeightDecay, bool Nesterov);
