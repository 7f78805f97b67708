using System.CommandLine;
using PeftSharp.Engine;

namespace PeftSharp.Trainer.Commands;

/// <summary>The flags several commands take, made once per parse so every command shows the same name, help and default.</summary>
internal sealed class SharedOptions
{
    public Option<string> Device { get; } = new("--device")
    {
        Description = $"auto | cpu | cuda[:i] | opencl[:i] | ilgpu-cpu (default: ${Devices.EnvironmentVariable}, else auto)",
    };

    public Option<bool> Json { get; } = new("--json") { Description = "Print results as JSON lines instead of text" };
    public Option<bool> Overwrite { get; } = new("--overwrite") { Description = "Replace what --out already holds (a model, adapter or delta); without it, such an --out is refused" };
    public Option<bool> Quiet { get; } = new("--quiet") { Description = "Log lines instead of a progress bar" };
    public Option<string> Data { get; } = new("--data") { Description = "builtin:tasks | builtin:tasks=add,sort | FILE.jsonl | FILE.txt", DefaultValueFactory = _ => "builtin:tasks" };
    public Option<string> Out { get; } = new("--out") { Description = "Output folder (model, metrics.jsonl, loss.svg, checkpoint/)", Required = true };
    public Option<int> BatchSize { get; } = new("--batch-size") { DefaultValueFactory = _ => 16 };
    public Option<int> SeqLen { get; } = new("--seq-len") { DefaultValueFactory = _ => 40 };
    public Option<int> Seed { get; } = new("--seed") { DefaultValueFactory = _ => 1 };
    public Option<string> Model { get; } = new("--model") { Description = "Hugging Face model folder", Required = true };
    public Option<string> Base { get; } = new("--base") { Description = "The base model folder", Required = true };
    public Option<string> Finetuned { get; } = new("--finetuned") { Description = "The fine-tuned model folder", Required = true };

    /// <summary>A positive flag value, or the one-line error naming the flag.</summary>
    public static int Positive(string flag, int value) => value > 0 ? value : throw new ArgumentException($"{flag} {value}: must be positive");
}
