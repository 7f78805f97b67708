using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;
using Spectre.Console;

namespace PeftSharp.Trainer;

/// <summary>Training flags beyond <see cref="TrainOptions"/>.</summary>
internal sealed record TrainExtras
{
    public IReadOnlyList<string> Freeze { get; init; } = Array.Empty<string>();
    public float LayerDecay { get; init; } = 1f;
    public float EmaDecay { get; init; }
    public string Optimizer { get; init; } = "adamw";
    public float Momentum { get; init; } = 0.9f;
    /// <summary>Set for --method lora.</summary>
    public LoraAdapterConfig? Lora { get; init; }
    /// <summary>Train B only (A frozen at its random init).</summary>
    public bool LoraBOnly { get; init; }
    /// <summary>Sparse fine-tuning: the trainable entries of each parameter (stepped by a masked AdamW).</summary>
    public IReadOnlyDictionary<string, int[]>? SparseMasks { get; init; }
    /// <summary>SpIEL drop-and-regrow interval for sparse fine-tuning (0: fixed mask).</summary>
    public int RegrowEvery { get; init; }
    /// <summary>Sparse fine-tuning density (0: the default, 0.01) and mask source.</summary>
    public double Density { get; init; }
    public string MaskSource { get; init; } = "gradient";
    /// <summary>Prefix tuning's reparameterising MLP width (0: none).</summary>
    public int PrefixProjection { get; init; }
    /// <summary>Prefix tuning's virtual tokens (0: the default, 8).</summary>
    public int VirtualTokens { get; init; }
    /// <summary>One LoRA adapter per task of the data, trained in the same batches (adapter sets).</summary>
    public bool AdapterPerTask { get; init; }
    /// <summary>Pre-training: a folder whose tokenizer the new model uses (null: the built-in byte tokenizer).</summary>
    public string? TokenizerDir { get; init; }
    /// <summary>lora | lora-ga.</summary>
    public string LoraInit { get; init; } = "lora";
}

/// <summary>The host's jobs: thin wrappers that parse values, call the library and report.</summary>
internal sealed class Jobs
{
    private readonly IAnsiConsole console;
    private readonly bool quiet;

    /// <summary>The masks a sparse run ended with (they move under SpIEL regrowth).</summary>
    public IReadOnlyDictionary<string, int[]>? LastMasks { get; private set; }

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

    /// <summary>Trains with progress; writes metrics.jsonl, loss.svg and the final model (HF folder) to outDir.</summary>
    public IReadOnlyList<StepMetrics> Train(LlamaModel model, ExampleSource data, TrainOptions options, string outDir, string title, string? resume, TrainExtras? extras = null, Action<string>? save = null)
    {
        extras ??= new TrainExtras();
        if (extras.Freeze.Count > 0) console.WriteLine($"froze {ParameterTools.Freeze(model, extras.Freeze)} parameter tensors");
        var scale = extras.LayerDecay < 1f ? ParameterTools.LayerDecay(model.Config, extras.LayerDecay) : (_ => 1f);
        using Optimizer opt = extras.SparseMasks != null ? new MaskedAdamW(model.AllParameters, extras.SparseMasks, weightDecay: 0f) { LearningRateScale = scale } : extras.Optimizer switch
        {
            "adamw" => new AdamW(model.AllParameters, weightDecay: options.WeightDecay) { LearningRateScale = scale },
            "sgd" => new Sgd(model.AllParameters, momentum: extras.Momentum, weightDecay: 0f) { LearningRateScale = scale },
            _ => throw new ArgumentException($"--optimizer {extras.Optimizer}: use adamw or sgd"),
        };
        using var ema = extras.EmaDecay > 0 ? new WeightEma(model, extras.EmaDecay) : null;
        using var regrow = extras.RegrowEvery > 0 && opt is MaskedAdamW masked ? new SparseRegrow(masked, extras.RegrowEvery) : null;
        var schedule = new LearningRateSchedule.Warmup(options.LearningRate, options.WarmupSteps, options.Steps, Cosine: true, MinLearningRate: options.LearningRate / 10);
        var run = new TrainingRun(model, opt, schedule, data, options);
        if (ema != null) run.ExtraStates.Add(ema); // the EMA travels in checkpoints and resumes with the run
        if (opt is MaskedAdamW sparse) run.ExtraStates.Add(new SparseState(sparse, regrow)); // masks (and regrow state) too
        if (resume != null) run.Resume(resume);
        IReadOnlyList<StepMetrics> metrics;
        if (quiet)
        {
            metrics = run.Run(outDir, m =>
            {
                ema?.Update();
                regrow?.AfterStep(m.Step);
                if (m.Step % 50 == 0 || m.Step == options.Steps) console.WriteLine($"{title} step {m.Step}/{options.Steps} loss {m.Loss:F4} lr {m.LearningRate:G3} {m.TokensPerSecond:F0} tok/s");
            });
        }
        else
        {
            metrics = Array.Empty<StepMetrics>();
            console.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask(title, maxValue: options.Steps);
                    task.Value = run.Step;
                    metrics = run.Run(outDir, m =>
                    {
                        ema?.Update();
                        regrow?.AfterStep(m.Step);
                        task.Value = m.Step;
                        task.Description = $"{title}: loss {m.Loss:F3}, {m.TokensPerSecond:F0} tok/s";
                    });
                });
        }

        ema?.CopyToModel(); // the saved (and evaluated) model is the average
        if (regrow != null) console.WriteLine($"SpIEL: {regrow.Regrown:N0} entries dropped and regrown over the run (every {regrow.Every} steps)");
        if (opt is MaskedAdamW final) LastMasks = final.Masks;
        if (save != null) save(outDir);
        else HuggingFaceFolder.Save(model, outDir);
        var all = ReadAllMetrics(outDir, metrics);
        PeftSharp.Formats.AtomicFile.WriteText(Path.Combine(outDir, "loss.svg"), LossCurve.Svg(all, title));
        return metrics;
    }

    private static IReadOnlyList<StepMetrics> ReadAllMetrics(string outDir, IReadOnlyList<StepMetrics> fallback)
    {
        string path = Path.Combine(outDir, "metrics.jsonl");
        if (!File.Exists(path)) return fallback;
        var list = new List<StepMetrics>();
        foreach (var line in File.ReadLines(path))
        {
            using var d = System.Text.Json.JsonDocument.Parse(line);
            var r = d.RootElement;
            list.Add(new StepMetrics(r.GetProperty("step").GetInt32(), r.GetProperty("loss").GetDouble(), r.GetProperty("grad_norm").GetDouble(), r.GetProperty("lr").GetSingle(), r.GetProperty("tokens_per_second").GetDouble(), 0));
        }

        return list;
    }

    public void PrintEval(string label, EvalResult r) =>
        console.MarkupLine($"{Markup.Escape(label)}: loss [bold]{r.Loss:F4}[/], perplexity {r.Perplexity:F2}, exact match [bold]{r.ExactMatch:P1}[/] of {r.Examples}");
}
