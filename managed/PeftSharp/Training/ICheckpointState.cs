using PeftSharp.Formats;

namespace PeftSharp.Training;

/// <summary>More state a checkpoint carries beside the model and optimizer (an EMA of the weights, ...): one safetensors file.</summary>
public interface ICheckpointState
{
    /// <summary>File name inside the checkpoint folder.</summary>
    string File { get; }

    IEnumerable<SafeTensorData> Export();

    /// <summary>Restores from the file; every mismatch is an error naming it.</summary>
    void Import(SafeTensorsFile file);
}
