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

    /// <summary>What training reads and what it is scored on afterwards, described for the log.</summary>
    public sealed record DataPlan(ExampleSource Train, List<Example> HeldOut, bool CompletionOnly, string Description);

    /// <summary>
    /// builtin:tasks, builtin:tasks=add,sort, a .jsonl file (prompt/completion or text lines) or a UTF-8 text file.
    /// Built-in tasks hold out their own split (<paramref name="builtinHeldOut"/> examples, never trained on); a file
    /// trains on all of it unless <paramref name="evalSplit"/> splits a fraction off, and <paramref name="evalData"/>
    /// names held-out data of its own. Documents are cut into windows of <paramref name="seqLen"/> tokens.
    /// </summary>
    public static DataPlan Data(string spec, int seed, ITokenizer tokenizer, int seqLen, double evalSplit = 0, string? evalData = null, int builtinHeldOut = 64, string flag = "--data")
    {
        if (evalSplit != 0 && !(evalSplit > 0 && evalSplit < 1)) throw new ArgumentException($"--eval-split {evalSplit}: must be in (0, 1)");
        List<Example>? separate = evalData != null ? ReadFile(evalData, "--eval-data", tokenizer, seqLen) : null;
        if (spec.StartsWith("builtin:", StringComparison.Ordinal))
        {
            if (evalSplit != 0) throw new ArgumentException($"--eval-split applies to data files; {spec} holds out its own split (or give --eval-data FILE)");
            var tasks = TaskNames(spec, flag);
            var held = separate ?? TaskSuite.Stream(tasks, seed + 1000, Split.HeldOut).Take(builtinHeldOut).ToList();
            return new DataPlan(ExampleSource.Tasks(tasks, seed, Split.Train), held, false,
                $"{spec}, scored on {(separate != null ? $"{evalData} ({held.Count} examples)" : $"{held.Count} held-out examples of the tasks' own split")}");
        }

        var examples = ReadFile(spec, flag, tokenizer, seqLen);
        bool completionOnly = examples.Any(e => e.HasPrompt);
        string unit = examples[0].Ids != null ? $"windows of {seqLen} tokens" : "examples";
        if (evalSplit > 0)
        {
            var (train, held) = DataFiles.HoldOut(examples, evalSplit, seed);
            if (separate != null) throw new ArgumentException("--eval-split and --eval-data both name held-out data; give one");
            return new DataPlan(ExampleSource.List(train), held, completionOnly,
                $"{spec}: {train.Count} {unit} trained on, {held.Count} held out (--eval-split {evalSplit})");
        }

        return new DataPlan(ExampleSource.List(examples), separate ?? new List<Example>(), completionOnly,
            $"{spec}: {examples.Count} {unit}, all trained on; " + (separate != null ? $"scored on {evalData} ({separate.Count})" : "none held out (--eval-split 0.1 or --eval-data FILE to score)"));
    }

    /// <summary>What scoring commands score: a built-in spec's held-out split (<paramref name="builtinExamples"/> of it), or every example of a file.</summary>
    public static List<Example> ScoredExamples(string spec, int seed, ITokenizer tokenizer, int seqLen, int builtinExamples) =>
        spec.StartsWith("builtin:", StringComparison.Ordinal) ? Data(spec, seed, tokenizer, seqLen, builtinHeldOut: builtinExamples).HeldOut : ReadFile(spec, "--data", tokenizer, seqLen);

    /// <summary>Every example of a data file, documents cut into windows; <paramref name="flag"/> names it in errors.</summary>
    public static List<Example> ReadFile(string path, string flag, ITokenizer tokenizer, int seqLen)
    {
        if (!File.Exists(path)) throw new ArgumentException($"{flag} {path}: file not found");
        var examples = path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) ? DataFiles.ReadJsonl(path) : DataFiles.ReadText(path);
        if (examples.Any(e => e.HasPrompt)) return examples;
        var windows = DataFiles.Windows(examples, tokenizer, seqLen);
        return windows.Count > 0 ? windows : throw new PeftSharpInputException($"{path}: no tokens to train on");
    }

    /// <summary>The task names of a builtin:tasks data spec (the tasks Data streams, and what --adapter-per-task trains an adapter for).</summary>
    public static IReadOnlyList<string> TaskNames(string spec, string flag = "--data") =>
        spec == "builtin:tasks" ? TaskSuite.Tasks
        : spec.StartsWith("builtin:tasks=", StringComparison.Ordinal) ? spec["builtin:tasks=".Length..].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
        : throw new ArgumentException($"{flag} {spec}: use builtin:tasks or builtin:tasks=NAME,NAME (tasks: {string.Join(", ", TaskSuite.Tasks)})");

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
        IReadOnlyList<StepMetrics> Run(Action<StepMetrics> onStep) => Finetune.Train(model, data, options, finetune, outDir, title, recipe, resume, onStep, console.WriteLine, save,
            Commands.Host.Interruption);
        if (quiet)
        {
            return Run(m =>
            {
                if (m.Step % 50 == 0 || m.Step == options.Steps) console.WriteLine($"{title} step {m.Step}/{options.Steps} loss {m.Loss:F4} lr {m.LearningRate:G3} {m.TokensPerSecond:F0} tok/s");
            });
        }

        IReadOnlyList<StepMetrics> metrics = Array.Empty<StepMetrics>();
        console.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(title, maxValue: options.Steps);
                var clock = System.Diagnostics.Stopwatch.StartNew();
                int first = -1;
                metrics = Run(m =>
                {
                    task.Value = m.Step;
                    if (first < 0) first = m.Step - 1; // a resumed run starts part way
                    double perStep = clock.Elapsed.TotalSeconds / Math.Max(1, m.Step - first);
                    var eta = TimeSpan.FromSeconds(Math.Round(perStep * (options.Steps - m.Step)));
                    task.Description = $"{title} step {m.Step}/{options.Steps}: loss {m.Loss:F3}, {m.TokensPerSecond:F0} tok/s, ETA {eta:hh\\:mm\\:ss}";
                });
            });
        return metrics;
    }

    /// <summary>Evaluates with a progress bar that says which part runs (loss, then exact match by batched greedy generation).</summary>
    public EvalResult Evaluate(LlamaModel model, IReadOnlyList<Example> held, int seqLen, bool completionOnly, string label)
    {
        if (quiet) return Evaluator.Evaluate(model, held, seqLen, completionOnly);
        EvalResult result = null!;
        console.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask($"{label}: loss", maxValue: 1);
                result = Evaluator.Evaluate(model, held, seqLen, completionOnly, progress: (phase, done, total) =>
                {
                    task.Description = $"{label}: {(phase == "loss" ? "loss" : "exact match (greedy, batched)")} {done}/{total}";
                    task.MaxValue = Math.Max(total, 1);
                    task.Value = done;
                });
                task.Value = task.MaxValue;
            });
        return result;
    }

    public void PrintEval(string label, EvalResult r) =>
        console.MarkupLine($"{Markup.Escape(label)}: loss [bold]{r.Loss:F4}[/], perplexity {r.Perplexity:F2}, " +
            (r.Matched > 0 ? $"exact match [bold]{r.ExactMatch:P1}[/] of {r.Matched}" : $"{r.Examples} windows (no prompts, so no exact match)"));
}
