using System.CommandLine;
using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>The training flags beyond <see cref="TrainOptions"/>, as given (checked and mapped to <see cref="FinetuneOptions"/> by <see cref="TrainCommand"/>).</summary>
internal sealed record TrainFlags
{
    public IReadOnlyList<string> Freeze { get; init; } = Array.Empty<string>();
    public float LayerDecay { get; init; } = 1f;
    public float EmaDecay { get; init; }
    public string Optimizer { get; init; } = "adamw";
    public float Momentum { get; init; } = 0.9f;
    public int GaLoreRank { get; init; } = 8;
    public int GaLoreEvery { get; init; } = 200;
    public bool GaLoreCrossHead { get; init; }
    public LoraAdapterConfig? Lora { get; init; }
    public bool LoraBOnly { get; init; }
    public string LoraInit { get; init; } = "lora";
    public bool AdapterPerTask { get; init; }
    public double Density { get; init; } = 0.01;
    public string MaskSource { get; init; } = "gradient";
    public int RegrowEvery { get; init; }
    public int VirtualTokens { get; init; } = 8;
    public int PrefixProjection { get; init; }
    public float MezoEpsilon { get; init; } = 1e-3f;
    public string? TokenizerDir { get; init; }
    public double EvalSplit { get; init; }

    /// <summary>The method- and optimizer-specific flags given on the command line (not left at their defaults).</summary>
    public IReadOnlySet<string> Given { get; init; } = new HashSet<string>();
    public string? EvalData { get; init; }
    public bool Overwrite { get; init; }
}

/// <summary>`peft pretrain` and `peft finetune`: flags to a <see cref="FinetuneOptions"/> recipe, run by the library's <see cref="Finetune"/>.</summary>
internal static class TrainCommand
{
    public static Command Create(SharedOptions o, string name, string description, bool finetune, TextWriter stdout)
    {
        var steps = new Option<int>("--steps") { Description = "Optimizer steps", DefaultValueFactory = _ => 300 };
        var lr = new Option<float>("--lr") { Description = "Peak learning rate (warmup, then cosine to a tenth)", DefaultValueFactory = _ => 3e-3f };
        var resume = new Option<string?>("--resume") { Description = "Continue from a checkpoint folder (OUT/checkpoint)" };
        var skipNonFinite = new Option<bool>("--skip-nonfinite") { Description = "Skip a step whose loss or gradient norm is NaN or infinite (default: stop with an error naming the step)" };
        var ckptEvery = new Option<int>("--checkpoint-every") { Description = "Steps between checkpoints (0: none)", DefaultValueFactory = _ => 100 };
        var config = new Option<string>("--config") { Description = "tiny | small | CONFIG.json", DefaultValueFactory = _ => "tiny" };
        var tokenizerDir = new Option<string?>("--tokenizer") { Description = "A folder with tokenizer.json or tokenizer.model to pre-train with (tiny/small take its vocabulary size); " +
            "default: the built-in byte tokenizer" };
        var freeze = new Option<string[]>("--freeze") { Description = "Freeze parameters whose name matches (glob, repeatable): --freeze 'model.embed_tokens.*'",
            AllowMultipleArgumentsPerToken = true };
        var layerDecay = new Option<float>("--layer-decay") { Description = "Layer-wise learning-rate decay factor in (0, 1]", DefaultValueFactory = _ => 1f };
        var emaDecay = new Option<float>("--ema") { Description = "Keep an EMA of the weights with this decay and save it", DefaultValueFactory = _ => 0f };
        var clipPer = new Option<bool>("--clip-per-parameter") { Description = "Clip each gradient to --clip on its own" };
        var clip = new Option<double>("--clip") { Description = "Gradient norm clip (0: off)", DefaultValueFactory = _ => 1.0 };
        var accum = new Option<int>("--grad-accum") { Description = "Micro-batches per optimizer step", DefaultValueFactory = _ => 1 };
        var optimizerKind = new Option<string>("--optimizer") { Description = "adamw | sgd | galore (AdamW in a low-rank projection of each gradient)", DefaultValueFactory = _ => "adamw" };
        var galoreRank = new Option<int>("--galore-rank") { Description = "GaLore: projection rank r", DefaultValueFactory = _ => 8 };
        var galoreEvery = new Option<int>("--galore-every") { Description = "GaLore: refresh the projection every T steps", DefaultValueFactory = _ => 200 };
        var galoreCrossHead = new Option<bool>("--galore-cross-head") { Description = "GaLore+: project attention weights on the hidden side with a basis from a few heads" };
        var momentum = new Option<float>("--momentum") { Description = "SGD momentum (0: plain SGD)", DefaultValueFactory = _ => 0.9f };
        var method = new Option<string>("--method")
        {
            Description = "full | lora | ia3 | ln-tuning | ssf | mezo | prefix | sparse (1-bit deltas come from peft compress)", DefaultValueFactory = _ => "full",
        };
        var density = new Option<double>("--density") { Description = "Sparse fine-tuning: fraction of each tensor's entries that train", DefaultValueFactory = _ => 0.01 };
        var regrowEvery = new Option<int>("--regrow-every") { Description = "Sparse fine-tuning: every N steps drop the smallest changes and regrow at the largest accumulated gradients " +
            "(SpIEL; 0: fixed mask)", DefaultValueFactory = _ => 0 };
        var maskSource = new Option<string>("--mask") { Description = "Sparse fine-tuning mask: gradient | weight | random", DefaultValueFactory = _ => "gradient" };
        var prefixProjection = new Option<int>("--prefix-projection") { Description = "Prefix tuning through a reparameterising MLP with this hidden size (P-tuning v2; 0: train the keys " +
            "and values directly)", DefaultValueFactory = _ => 0 };
        var mezoEps = new Option<float>("--mezo-eps") { Description = "MeZO: the perturbation scale eps", DefaultValueFactory = _ => 1e-3f };
        var virtualTokens = new Option<int>("--virtual-tokens") { Description = "Prefix tuning: trainable virtual tokens per layer", DefaultValueFactory = _ => 8 };
        var groupCompletions = new Option<bool>("--group-completions") { Description = "Train examples that share a prompt as one prompt with several completions (encoded once)" };
        var rank = new Option<int>("--rank") { Description = "LoRA rank r", DefaultValueFactory = _ => 8 };
        var alpha = new Option<float>("--alpha") { Description = "LoRA alpha (scale alpha / r, or alpha / sqrt(r) with --rslora)", DefaultValueFactory = _ => 16f };
        var targetsOpt = new Option<string>("--targets") { Description = "all-linear, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", DefaultValueFactory = _ =>
            "all-linear" };
        var rslora = new Option<bool>("--rslora") { Description = "rank-stabilised scaling alpha / sqrt(r)" };
        var dora = new Option<bool>("--dora") { Description = "DoRA: train a magnitude vector per module beside the low-rank direction" };
        var loraBias = new Option<bool>("--lora-bias")
        {
            Description = "PEFT's lora_bias: lora_B trains a bias too (served unmerged per row; merges only into modules that have a bias, as PEFT's merge)",
        };
        var bOnly = new Option<bool>("--b-only") { Description = "Train only B; A stays at its random init" };
        var adapterPerTask = new Option<bool>("--adapter-per-task") { Description = "With --method lora and builtin:tasks=A,B,...: one adapter per task, all trained in the same batches " +
            "(OUT/<task>/ each)" };
        var loraDropout = new Option<float>("--dropout") { Description = "LoRA dropout on the adapter's input while training", DefaultValueFactory = _ => 0f };
        var loraInit = new Option<string>("--init") { Description = "lora (A random, B zero) | lora-ga (A, B from the SVD of the full gradient)", DefaultValueFactory = _ => "lora" };
        var evalSplit = new Option<double>("--eval-split") { Description = "Hold out this fraction of a data file (seeded choice) and score it after training (default 0: " +
            "train on all of it; builtin tasks hold out their own split)", DefaultValueFactory = _ => 0 };
        var evalData = new Option<string?>("--eval-data") { Description = "A data file to score after training (held out: never trained on)" };
        var chainEvery = new Option<int>("--chain-every") { Description = "Chain of LoRA: merge into the base every N steps and start a fresh adapter; saves the merged model (0: off)",
            DefaultValueFactory = _ => 0 };

        var c = new Command(name, description);
        foreach (var opt in new Option[] { o.Device, o.Data, steps, o.Out, o.BatchSize, o.SeqLen, lr, o.Seed, resume, ckptEvery, skipNonFinite, o.Quiet, freeze, layerDecay, emaDecay, clipPer, clip,
            accum, optimizerKind, momentum, galoreRank, galoreEvery, galoreCrossHead, evalSplit, evalData, o.Overwrite }) c.Options.Add(opt);
        if (finetune)
        {
            foreach (var opt in new Option[] { o.Model, method, rank, alpha, targetsOpt, rslora, dora, loraBias, bOnly, adapterPerTask, loraDropout, loraInit, chainEvery, virtualTokens,
                groupCompletions, density, maskSource, regrowEvery, prefixProjection, mezoEps }) c.Options.Add(opt);
        }
        else
        {
            c.Options.Add(config);
            c.Options.Add(tokenizerDir);
        }

        c.SetAction(r => Run(r.GetValue(o.Device), finetune ? r.GetValue(o.Model) : null, finetune ? null : r.GetValue(config),
            finetune ? r.GetValue(method)! : "full", r.GetValue(o.Data)!, new TrainOptions
            {
                Steps = SharedOptions.Positive("--steps", r.GetValue(steps)),
                BatchSize = SharedOptions.Positive("--batch-size", r.GetValue(o.BatchSize)),
                SeqLen = SharedOptions.Positive("--seq-len", r.GetValue(o.SeqLen)),
                LearningRate = r.GetValue(lr) > 0 ? r.GetValue(lr) : throw new ArgumentException($"--lr {r.GetValue(lr)}: must be positive"),
                Seed = r.GetValue(o.Seed),
                CheckpointEvery = r.GetValue(ckptEvery),
                WarmupSteps = Math.Min(20, r.GetValue(steps) / 10),
                CompletionOnly = finetune,
                ClipNorm = r.GetValue(clip),
                ClipPerParameter = r.GetValue(clipPer),
                GradAccumulation = SharedOptions.Positive("--grad-accum", r.GetValue(accum)),
                ChainEvery = finetune ? r.GetValue(chainEvery) : 0,
                GroupCompletions = finetune && r.GetValue(groupCompletions),
                SkipNonFinite = r.GetValue(skipNonFinite),
            }, r.GetValue(o.Out)!, r.GetValue(resume), r.GetValue(o.Quiet), stdout, new TrainFlags
            {
                Freeze = r.GetValue(freeze) ?? Array.Empty<string>(),
                LayerDecay = r.GetValue(layerDecay),
                EmaDecay = r.GetValue(emaDecay),
                Optimizer = r.GetValue(optimizerKind)!,
                Momentum = r.GetValue(momentum),
                GaLoreRank = r.GetValue(galoreRank),
                GaLoreEvery = r.GetValue(galoreEvery),
                GaLoreCrossHead = r.GetValue(galoreCrossHead),
                Lora = finetune && r.GetValue(method) == "lora"
                    ? LoraConfigFrom(r.GetValue(rank), r.GetValue(alpha), r.GetValue(targetsOpt)!, r.GetValue(rslora)) with
                    {
                        UseDora = r.GetValue(dora), LoraBias = r.GetValue(loraBias), LoraDropout = r.GetValue(loraDropout),
                    }
                    : null,
                LoraInit = finetune ? r.GetValue(loraInit) ?? "lora" : "lora",
                LoraBOnly = finetune && r.GetValue(bOnly),
                AdapterPerTask = finetune && r.GetValue(adapterPerTask),
                VirtualTokens = finetune ? r.GetValue(virtualTokens) : 8,
                PrefixProjection = finetune ? r.GetValue(prefixProjection) : 0,
                MezoEpsilon = finetune ? r.GetValue(mezoEps) : 1e-3f,
                Density = finetune ? r.GetValue(density) : 0.01,
                MaskSource = finetune ? r.GetValue(maskSource) ?? "gradient" : "gradient",
                RegrowEvery = finetune ? r.GetValue(regrowEvery) : 0,
                TokenizerDir = finetune ? null : r.GetValue(tokenizerDir),
                EvalSplit = r.GetValue(evalSplit),
                EvalData = r.GetValue(evalData),
                Overwrite = r.GetValue(o.Overwrite),
                // Flags that belong to one method (or optimizer), as given: with another they would do nothing, so Recipe refuses them.
                Given = c.Options.Where(f => (MethodOfFlag.ContainsKey(f.Name) || f.Name is "--momentum" or "--galore-rank" or "--galore-every" or "--galore-cross-head")
                    && r.GetResult(f) is { Implicit: false }).Select(f => f.Name).ToHashSet(),
            }));
        return c;
    }

    /// <summary>The --method each method-specific flag belongs to (--momentum belongs to --optimizer sgd instead).</summary>
    private static readonly Dictionary<string, string> MethodOfFlag = new[]
    {
        ("lora", new[] { "--rank", "--alpha", "--targets", "--rslora", "--dora", "--lora-bias", "--b-only", "--adapter-per-task", "--dropout", "--init", "--chain-every" }),
        ("prefix", new[] { "--virtual-tokens", "--prefix-projection" }),
        ("sparse", new[] { "--density", "--mask", "--regrow-every" }),
        ("mezo", new[] { "--mezo-eps" }),
    }.SelectMany(m => m.Item2.Select(f => (Flag: f, Method: m.Item1))).ToDictionary(x => x.Flag, x => x.Method);

    /// <summary>The library recipe for the flags, every flag that does not fit the method refused by name.</summary>
    private static FinetuneOptions Recipe(string method, string dataSpec, TrainOptions options, TrainFlags flags)
    {
        var kind = method switch
        {
            "full" => FinetuneMethod.Full,
            "lora" => FinetuneMethod.Lora,
            "prefix" => FinetuneMethod.Prefix,
            "sparse" => FinetuneMethod.Sparse,
            "ia3" => FinetuneMethod.Ia3,
            "ln-tuning" => FinetuneMethod.LnTuning,
            "mezo" => FinetuneMethod.Mezo,
            "ssf" => FinetuneMethod.Ssf,
            _ => throw new ArgumentException($"--method {method}: use full, lora, ia3, ln-tuning, ssf, mezo, prefix or sparse (1-bit deltas come from peft compress)"),
        };
        string? owner(string flag) => MethodOfFlag.GetValueOrDefault(flag);
        var idle = flags.Given.Where(f => owner(f) is string m && m != method).ToList();
        if (idle.Count > 0)
        {
            throw new ArgumentException($"{string.Join(", ", idle)} {(idle.Count == 1 ? "applies" : "apply")} to --method {string.Join(" / ", idle.Select(f => owner(f)).Distinct())}, " +
                $"not --method {method}: {(idle.Count == 1 ? "it" : "they")} would do nothing");
        }

        if (flags.Given.Contains("--momentum") && flags.Optimizer != "sgd") throw new ArgumentException($"--momentum applies to --optimizer sgd, not {flags.Optimizer}: it would do nothing");
        foreach (var f in new[] { "--galore-rank", "--galore-every", "--galore-cross-head" }.Where(f => flags.Given.Contains(f) && flags.Optimizer != "galore"))
        {
            throw new ArgumentException($"{f} applies to --optimizer galore, not {flags.Optimizer}: it would do nothing");
        }

        if (flags.GaLoreRank < 1 || flags.GaLoreEvery < 1) throw new ArgumentException($"--galore-rank {flags.GaLoreRank} and --galore-every {flags.GaLoreEvery} must be at least 1");
        if (flags.RegrowEvery < 0) throw new ArgumentException($"--regrow-every {flags.RegrowEvery}: must be >= 0");
        if (flags.PrefixProjection < 0) throw new ArgumentException($"--prefix-projection {flags.PrefixProjection}: must be >= 0");
        if (options.ChainEvery < 0) throw new ArgumentException($"--chain-every {options.ChainEvery}: must be >= 0");
        var optimizer = flags.Optimizer switch
        {
            "adamw" => OptimizerKind.AdamW,
            "sgd" => OptimizerKind.Sgd,
            "galore" => OptimizerKind.GaLore,
            _ => throw new ArgumentException($"--optimizer {flags.Optimizer}: use adamw, sgd or galore"),
        };
        double density = flags.Density;
        if (density is <= 0 or > 1) throw new ArgumentException($"--density {density}: must be in (0, 1]");
        var mask = flags.MaskSource switch
        {
            "gradient" => MaskSource.Gradient,
            "weight" => MaskSource.Weight,
            "random" => MaskSource.Random,
            _ => throw new ArgumentException($"--mask {flags.MaskSource}: use gradient, weight or random"),
        };
        int tokens = flags.VirtualTokens;
        if (tokens <= 0) throw new ArgumentException($"--virtual-tokens {tokens}: must be positive");
        if (flags.LayerDecay is <= 0f or > 1f) throw new ArgumentException($"--layer-decay {flags.LayerDecay}: must be in (0, 1]");
        if (flags.EmaDecay is < 0f or >= 1f) throw new ArgumentException($"--ema {flags.EmaDecay}: must be in [0, 1)");
        var init = flags.LoraInit switch
        {
            "lora" => LoraInit.Default,
            "lora-ga" => LoraInit.LoraGa,
            _ => throw new ArgumentException($"--init {flags.LoraInit}: use lora or lora-ga"),
        };
        if (flags.Lora is { } lora)
        {
            if (lora.LoraDropout is < 0f or >= 1f) throw new ArgumentException($"--dropout {lora.LoraDropout}: must be in [0, 1)");
            if (init == LoraInit.LoraGa && (lora.UseDora || flags.LoraBOnly)) throw new NotSupportedException("--init lora-ga combines with neither --dora nor --b-only");
            if (lora.LoraBias && (lora.UseDora || init == LoraInit.LoraGa || options.ChainEvery > 0))
            {
                throw new NotSupportedException("--lora-bias combines with neither --dora (nor in PEFT), --init lora-ga nor --chain-every (whose merges need a bias on every module)");
            }
            if (flags.AdapterPerTask && (init != LoraInit.Default || flags.LoraBOnly || lora.UseDora || options.ChainEvery > 0 || options.GroupCompletions))
            {
                throw new NotSupportedException("--adapter-per-task trains plain LoRA (with --rank, --alpha, --targets, --rslora, --dropout); not with --dora, --b-only, --init lora-ga, " +
                    "--chain-every or --group-completions");
            }
        }

        return new FinetuneOptions
        {
            Method = kind, Freeze = flags.Freeze, LayerDecay = flags.LayerDecay, EmaDecay = flags.EmaDecay, Optimizer = optimizer, Momentum = flags.Momentum,
            Lora = flags.Lora, LoraBOnly = flags.LoraBOnly, LoraInit = init, AdapterPerTask = flags.AdapterPerTask ? Jobs.TaskNames(dataSpec) : null,
            Density = density, MaskSource = mask, RegrowEvery = flags.RegrowEvery, VirtualTokens = tokens, PrefixProjection = flags.PrefixProjection,
            MezoEpsilon = flags.MezoEpsilon, GaLoreRank = flags.GaLoreRank, GaLoreEvery = flags.GaLoreEvery, GaLoreCrossHead = flags.GaLoreCrossHead,
        };
    }

    private static int Run(string? deviceSpec, string? modelDir, string? configSpec, string method, string dataSpec, TrainOptions options, string outDir, string? resume, bool quiet,
        TextWriter stdout, TrainFlags flags)
    {
        var recipeOptions = Recipe(method, dataSpec, options, flags);
        Host.CheckOutput(outDir, flags.Overwrite, resuming: resume != null, ("--model", modelDir), ("--resume", resume));
        if (resume != null)
        {
            // A kill in the instant of a checkpoint swap leaves only OUT/checkpoint.old: that is the checkpoint then.
            resume = TrainingRun.LocateCheckpoint(resume)
                ?? throw new FileNotFoundException($"--resume {resume}: not a checkpoint (no trainer_state.json there or in {resume}.old)", resume);
        }

        // A resumed sparse run takes its masks from the checkpoint and its starting weights from --model (the delta's base).
        if (recipeOptions.Method == FinetuneMethod.Sparse && resume != null
            && modelDir == null) throw new ArgumentException("--resume with --method sparse needs --model: the sparse delta is taken against that base");
        var console = Host.Console(stdout);
        using var device = Host.OpenDevice(deviceSpec);
        using var model = resume != null ? Host.LoadTextModel(resume, device)
            : modelDir != null ? Host.LoadTextModel(modelDir, device)
            : NewModel(device, configSpec!, flags.TokenizerDir, options.Seed);
        if (flags.Lora is { } lora)
        {
            foreach (var module in lora.TargetsIn(model.Config))
            {
                var (outF, inF) = PeftLoraAdapter.LinearShape(model.Config, module);
                if (lora.For(module).Rank > Math.Min(outF, inF))
                {
                    throw new ArgumentException($"--rank {lora.For(module).Rank}: larger than {module} ({outF} x {inF}) can use; a rank above min(out, in) = {Math.Min(outF, inF)} " +
                        "adds parameters and no capacity");
                }
            }
        }

        var data = Jobs.Data(dataSpec, options.Seed, model.Tokenizer, options.SeqLen, flags.EvalSplit, flags.EvalData);
        var (train, held) = (data.Train, data.HeldOut);
        if (options.GroupCompletions && !data.CompletionOnly) throw new ArgumentException($"--group-completions needs prompt/completion data; {dataSpec} is text");
        options = options with { CompletionOnly = options.CompletionOnly || data.CompletionOnly };
        var jobs = new Jobs(console, quiet);
        console.MarkupLine($"{(modelDir == null ? "pre-training" : "fine-tuning")} {model.ParameterCount:N0} parameters on [bold]{Markup.Escape(device.Info.Spec)}[/], " +
            $"{options.Steps} steps; data {Markup.Escape(data.Description)}");
        var settings = RunSettings(method, dataSpec, recipeOptions, flags);
        if (modelDir != null)
        {
            // The base the run started from: a resume with another --model (another shape or other weights' config) is refused.
            var baseConfig = HuggingFaceFolder.ReadConfig(modelDir);
            string hash = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(baseConfig.ToJson())))[..12];
            settings["model"] = $"{baseConfig.NumHiddenLayers} layers x {baseConfig.HiddenSize}, vocab {baseConfig.VocabSize}, config {hash}";
        }

        options = options with { RunSettings = settings };
        if (resume != null && TrainingRun.CheckpointStep(resume) is int done && done >= options.Steps)
        {
            console.MarkupLine(Markup.Escape($"the checkpoint is at step {done} of --steps {options.Steps}: nothing left to train; writing its output (raise --steps to train further)"));
        }

        var recipe = Finetune.Prepare(model, recipeOptions, options, train, modelDir, resume);
        if (recipe.Description != null) console.MarkupLine(Markup.Escape(recipe.Description));
        jobs.Train(model, train, options, outDir, modelDir == null ? "pretrain" : "finetune", resume, recipeOptions, recipe);
        if (recipeOptions.AdapterPerTask is { } tasks)
        {
            foreach (var task in tasks)
            {
                using var alone = Finetune.WithAdapterOf(model, task, recipe.Adapter!, options.Seed, modelDir);
                var taskHeld = held.Where(e => e.Task == task).ToList();
                if (taskHeld.Count > 0) jobs.PrintEval($"held-out '{task}' through its adapter", jobs.Evaluate(alone, taskHeld, options.SeqLen, options.CompletionOnly, task));
            }

            console.MarkupLine($"PEFT adapters {string.Join(", ", tasks.Select(t => Markup.Escape(Path.Combine(Path.GetFullPath(outDir), t))))}, metrics.jsonl and loss.svg written to " +
                $"[bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
            return 0;
        }

        if (held.Count > 0)
        {
            var result = jobs.Evaluate(model, held, options.SeqLen, options.CompletionOnly, "held-out");
            jobs.PrintEval("held-out", result);
            Finetune.WriteLossCurve(outDir, modelDir == null ? "pretrain" : "finetune", evals: new[] { (options.Steps, result.Loss) });
        }

        console.MarkupLine($"{Markup.Escape(recipe.Output)}, metrics.jsonl and loss.svg written to [bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
        return 0;
    }

    /// <summary>What defines this run beyond TrainOptions, compared with a checkpoint's on --resume (eval data only scores, so it may change).</summary>
    private static Dictionary<string, string> RunSettings(string method, string dataSpec, FinetuneOptions recipe, TrainFlags flags)
    {
        static string F(double v) => v.ToString("R", System.Globalization.CultureInfo.InvariantCulture);
        var d = new Dictionary<string, string>
        {
            ["data"] = File.Exists(dataSpec) ? Path.GetFullPath(dataSpec) : dataSpec, ["eval_split"] = F(flags.EvalSplit), ["method"] = method, ["optimizer"] = flags.Optimizer,
            ["freeze"] = string.Join(",", flags.Freeze), ["layer_decay"] = F(flags.LayerDecay), ["ema"] = F(flags.EmaDecay),
        };
        if (flags.Optimizer == "sgd") d["momentum"] = F(flags.Momentum);
        if (flags.Optimizer == "galore") d["galore"] = $"rank={flags.GaLoreRank} every={flags.GaLoreEvery}{(flags.GaLoreCrossHead ? " cross-head" : "")}";
        if (recipe.Lora is { } l)
        {
            d["lora"] = $"r={l.R} alpha={F(l.LoraAlpha)} targets={l.TargetRegex ?? string.Join(",", l.TargetModules)} rslora={l.UseRsLora} dora={l.UseDora} dropout={F(l.LoraDropout)} " +
                (l.LoraBias ? "lora_bias=True " : "") + $"b_only={recipe.LoraBOnly} init={recipe.LoraInit} per_task={recipe.AdapterPerTask != null}";
        }

        if (recipe.Method == FinetuneMethod.Prefix) d["prefix"] = $"tokens={recipe.VirtualTokens} projection={recipe.PrefixProjection}";
        if (recipe.Method == FinetuneMethod.Sparse) d["sparse"] = $"density={F(recipe.Density)} mask={recipe.MaskSource} regrow_every={recipe.RegrowEvery}";
        return d;
    }

    /// <summary>A fresh model for pre-training: with a tokenizer folder, tiny/small take its vocabulary size and the model carries its files.</summary>
    private static LlamaModel NewModel(Device device, string configSpec, string? tokenizerDir, int seed)
    {
        var config = Jobs.Config(configSpec);
        if (tokenizerDir == null) return LlamaModel.Create(device, config, seed);
        if (!HfTokenizer.Present(tokenizerDir)) throw new ArgumentException($"--tokenizer {tokenizerDir}: no {HfTokenizer.JsonFile} or {HfTokenizer.SentencePieceFile} there");
        var tok = HfTokenizer.Load(tokenizerDir);
        if (configSpec is "tiny" or "small") config = config with { VocabSize = tok.VocabSize };
        else if (config.VocabSize < tok.VocabSize) throw new ArgumentException($"--config {configSpec}: vocab_size {config.VocabSize} is smaller than the tokenizer's {tok.VocabSize} ids");
        var model = LlamaModel.Create(device, config, seed);
        model.UseTokenizerFiles(tokenizerDir, HfTokenizer.ReadFiles(tokenizerDir));
        return model;
    }

    public static LoraAdapterConfig LoraConfigFrom(int rank, float alpha, string targets, bool rsLora)
    {
        if (rank <= 0) throw new ArgumentException($"--rank {rank}: must be positive");
        if (alpha <= 0) throw new ArgumentException($"--alpha {alpha}: must be positive");
        var list = targets.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        if (targets != "all-linear")
        {
            var unknown = list.Where(t => !LoraAdapterConfig.LlamaLinear.Contains(t)).ToList();
            if (unknown.Count > 0
                || list.Length == 0) throw new ArgumentException($"--targets {targets}: use all-linear or names from {string.Join(", ", LoraAdapterConfig.LlamaLinear)} (unknown: " +
                    $"{string.Join(", ", unknown)})");
        }

        return new LoraAdapterConfig
        {
            R = rank, LoraAlpha = alpha, UseRsLora = rsLora,
            TargetRegex = targets == "all-linear" ? "all-linear" : null,
            TargetModules = targets == "all-linear" ? Array.Empty<string>() : list,
        };
    }
}
