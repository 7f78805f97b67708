using PeftSharp.Data;
using PeftSharp.Model;
using PeftSharp.Training;
using Spectre.Console;

namespace PeftSharp.Trainer;

/// <summary>The host's jobs: thin wrappers that parse values, call the library and report.</summary>
internal sealed class Jobs
{
    private readonly IAnsiConsole console;
    private readonly bool quiet;

    public Jobs(IAnsiConsole console, bool quiet)
    {
        this.console = console;
        this.quiet = quiet;
    }

    /// <summary>builtin:tasks, builtin:tasks=add,sort, a .jsonl file, or a UTF-8 text file.</summary>
    public static (ExampleSource Train, List<Example> HeldOut, bool CompletionOnly) Data(string spec, int seed, int heldOut = 64)
    {
        if (spec.StartsWith("builtin:", StringComparison.Ordinal))
        {
            var tasks = TaskNames(spec);
            var held = TaskSuite.Stream(tasks, seed + 1000, Split.HeldOut).Take(heldOut).ToList();
            return (ExampleSource.Tasks(tasks, seed, Split.Train), held, false);
        }

        if (!File.Exists(spec)) throw new ArgumentException($"--data {spec}: file not found");
        var examples = spec.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) ? DataFiles.ReadJsonl(spec) : DataFiles.ReadText(spec);
        bool completionOnly = examples.Any(e => e.Prompt.Length > 0);
        int h = Math.Min(heldOut, examples.Count / 10);
        return (ExampleSource.List(examples.Skip(h).ToList()), examples.Take(h).ToList(), completionOnly);
    }

    /// <summary>The task names of a builtin:tasks data spec (the tasks Data streams, and what --adapter-per-task trains an adapter for).</summary>
    public static IReadOnlyList<string> TaskNames(string spec) =>
        spec == "builtin:tasks" ? TaskSuite.Tasks
        : spec.StartsWith("builtin:tasks=", StringComparison.Ordinal) ? spec["builtin:tasks=".Length..].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
        : throw new ArgumentException($"--data {spec}: use builtin:tasks or builtin:tasks=NAME,NAME (tasks: {string.Join(", ", TaskSuite.Tasks)})");

    public static LlamaConfig Config(string spec) => spec switch
    {
        "tiny" => LlamaConfig.Tiny,
        "small" => new LlamaConfig
        {
            HiddenSize = 256, IntermediateSize = 688, NumAttentionHeads = 8, NumKeyValueHeads = 4, NumHiddenLayers = 6,
            VocabSize = ByteTokenizer.VocabSize, RmsNormEps = 1e-5f, MaxPositionEmbeddings = 512, TieWordEmbeddings = true,
        },
        _ when File.Exists(spec) => LlamaConfig.Parse(File.ReadAllText(spec), spec),
        _ => throw new ArgumentException($"--config {spec}: use tiny, small or a config.json path"),
    };

    /// <summary>
    /// Trains through the library's <see cref="Finetune.Train"/> with a progress bar (or, quiet, a line every 50 steps);
    /// writes metrics.jsonl, loss.svg and the output (the recipe's, else <paramref name="save"/>'s, else the model as a
    /// Hugging Face folder) to outDir.
    /// </summary>
    public IReadOnlyList<StepMetrics> Train(LlamaModel model, ExampleSource data, TrainOptions options, string outDir, string title, string? resume,
        FinetuneOptions? recipeOptions = null, FinetuneRecipe? recipe = null, Action<string>? save = null)
    {
        var finetune = recipeOptions ?? recipe?.Options ?? new FinetuneOptions();
        IReadOnlyList<StepMetrics> Run(Action<StepMetrics> onStep) => Finetune.Train(model, data, options, finetune, outDir, title, recipe, resume, onStep, console.WriteLine, save);
        if (quiet)
        {
            return Run(m =>
            {
                if (m.Step % 50 == 0 || m.Step == options.Steps) console.WriteLine($"{title} step {m.Step}/{options.Steps} loss {m.Loss:F4} lr {m.LearningRate:G3} {m.TokensPerSecond:F0} tok/s");
            });
        }

        IReadOnlyList<StepMetrics> metrics = Array.Empty<StepMetrics>();
        console.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(title, maxValue: options.Steps);
                metrics = Run(m =>
                {
                    task.Value = m.Step;
                    task.Description = $"{title}: loss {m.Loss:F3}, {m.TokensPerSecond:F0} tok/s";
                });
            });
        return metrics;
    }

    public void PrintEval(string label, EvalResult r) =>
        console.MarkupLine($"{Markup.Escape(label)}: loss [bold]{r.Loss:F4}[/], perplexity {r.Perplexity:F2}, exact match [bold]{r.ExactMatch:P1}[/] of {r.Examples}");
}
