using System.CommandLine;
using PeftSharp.Engine;
using PeftSharp.Compression;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Training;
using Spectre.Console;

namespace PeftSharp.Trainer;

/// <summary>The `peft` host: parses flags, calls the library, reports. Every bad flag is a one-line error and exit code 2.</summary>
public static class Program
{
    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var deviceOption = new Option<string>("--device")
        {
            Description = $"auto | cpu | cuda[:i] | opencl[:i] | ilgpu-cpu (default: ${Devices.EnvironmentVariable}, else auto)",
        };

        var root = new RootCommand("PeftSharp: fine-tune and serve many variants of one transformer.");

        var devices = new Command("devices", "List every accelerator found and the one auto picks.");
        devices.SetAction(_ => Commands.ListDevices(stdout));
        root.Subcommands.Add(devices);

        var selfcheck = new Command("selfcheck", "Run a short kernel check against the double-precision references, on --device or on every device found.");
        selfcheck.Options.Add(deviceOption);
        selfcheck.SetAction(r => Commands.SelfCheck(r.GetValue(deviceOption), stdout, stderr));
        root.Subcommands.Add(selfcheck);

        var quiet = new Option<bool>("--quiet") { Description = "Log lines instead of a progress bar" };
        var data = new Option<string>("--data") { Description = "builtin:tasks | builtin:tasks=add,sort | FILE.jsonl | FILE.txt", DefaultValueFactory = _ => "builtin:tasks" };
        var steps = new Option<int>("--steps") { Description = "Optimizer steps", DefaultValueFactory = _ => 300 };
        var outDir = new Option<string>("--out") { Description = "Output folder (model, metrics.jsonl, loss.svg, checkpoint/)", Required = true };
        var batch = new Option<int>("--batch-size") { DefaultValueFactory = _ => 16 };
        var seqLen = new Option<int>("--seq-len") { DefaultValueFactory = _ => 40 };
        var lr = new Option<float>("--lr") { Description = "Peak learning rate (warmup, then cosine to a tenth)", DefaultValueFactory = _ => 3e-3f };
        var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 1 };
        var resume = new Option<string?>("--resume") { Description = "Continue from a checkpoint folder (OUT/checkpoint)" };
        var ckptEvery = new Option<int>("--checkpoint-every") { Description = "Steps between checkpoints (0: none)", DefaultValueFactory = _ => 100 };
        var config = new Option<string>("--config") { Description = "tiny | small | CONFIG.json", DefaultValueFactory = _ => "tiny" };
        var tokenizerDir = new Option<string?>("--tokenizer") { Description = "A folder with tokenizer.json or tokenizer.model to pre-train with (tiny/small take its vocabulary size); default: the built-in byte tokenizer" };
        var modelDir = new Option<string>("--model") { Description = "Hugging Face model folder", Required = true };
        var freeze = new Option<string[]>("--freeze") { Description = "Freeze parameters whose name matches (glob, repeatable): --freeze 'model.embed_tokens.*'", AllowMultipleArgumentsPerToken = true };
        var layerDecay = new Option<float>("--layer-decay") { Description = "Layer-wise learning-rate decay factor in (0, 1]", DefaultValueFactory = _ => 1f };
        var emaDecay = new Option<float>("--ema") { Description = "Keep an EMA of the weights with this decay and save it", DefaultValueFactory = _ => 0f };
        var clipPer = new Option<bool>("--clip-per-parameter") { Description = "Clip each gradient to --clip on its own" };
        var clip = new Option<double>("--clip") { Description = "Gradient norm clip (0: off)", DefaultValueFactory = _ => 1.0 };
        var accum = new Option<int>("--grad-accum") { Description = "Micro-batches per optimizer step", DefaultValueFactory = _ => 1 };
        var optimizerKind = new Option<string>("--optimizer") { Description = "adamw | sgd", DefaultValueFactory = _ => "adamw" };
        var momentum = new Option<float>("--momentum") { Description = "SGD momentum (0: plain SGD)", DefaultValueFactory = _ => 0.9f };
        var method = new Option<string>("--method") { Description = "full | lora | prefix | sparse (1-bit deltas come from peft compress)", DefaultValueFactory = _ => "full" };
        var density = new Option<double>("--density") { Description = "Sparse fine-tuning: fraction of each tensor's entries that train (e.g. 0.01)", DefaultValueFactory = _ => 0 };
        var regrowEvery = new Option<int>("--regrow-every") { Description = "Sparse fine-tuning: every N steps drop the smallest changes and regrow at the largest accumulated gradients (SpIEL; 0: fixed mask)", DefaultValueFactory = _ => 0 };
        var maskSource = new Option<string>("--mask") { Description = "Sparse fine-tuning mask: gradient | weight | random", DefaultValueFactory = _ => "gradient" };
        var prefixProjection = new Option<int>("--prefix-projection") { Description = "Prefix tuning through a reparameterising MLP with this hidden size (P-tuning v2; 0: train the keys and values directly)", DefaultValueFactory = _ => 0 };
        var virtualTokens = new Option<int>("--virtual-tokens") { Description = "Prefix tuning: trainable virtual tokens per layer", DefaultValueFactory = _ => 0 };
        var groupCompletions = new Option<bool>("--group-completions") { Description = "Train examples that share a prompt as one prompt with several completions (encoded once)" };
        var rank = new Option<int>("--rank") { Description = "LoRA rank r", DefaultValueFactory = _ => 8 };
        var alpha = new Option<float>("--alpha") { Description = "LoRA alpha (scale alpha / r, or alpha / sqrt(r) with --rslora)", DefaultValueFactory = _ => 16f };
        var targetsOpt = new Option<string>("--targets") { Description = "all-linear, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", DefaultValueFactory = _ => "all-linear" };
        var rslora = new Option<bool>("--rslora") { Description = "rank-stabilised scaling alpha / sqrt(r)" };
        var dora = new Option<bool>("--dora") { Description = "DoRA: train a magnitude vector per module beside the low-rank direction" };
        var bOnly = new Option<bool>("--b-only") { Description = "Train only B; A stays at its random init" };
        var adapterPerTask = new Option<bool>("--adapter-per-task") { Description = "With --method lora and builtin:tasks=A,B,...: one adapter per task, all trained in the same batches (OUT/<task>/ each)" };
        var loraDropout = new Option<float>("--dropout") { Description = "LoRA dropout on the adapter's input while training", DefaultValueFactory = _ => 0f };
        var loraInit = new Option<string>("--init") { Description = "lora (A random, B zero) | lora-ga (A, B from the SVD of the full gradient)", DefaultValueFactory = _ => "lora" };
        var chainEvery = new Option<int>("--chain-every") { Description = "Chain of LoRA: merge into the base every N steps and start a fresh adapter; saves the merged model (0: off)", DefaultValueFactory = _ => 0 };

        Command TrainCommand(string name, string description, bool finetune)
        {
            var c = new Command(name, description);
            foreach (var o in new Option[] { deviceOption, data, steps, outDir, batch, seqLen, lr, seed, resume, ckptEvery, quiet, freeze, layerDecay, emaDecay, clipPer, clip, accum, optimizerKind, momentum }) c.Options.Add(o);
            if (finetune)
            {
                foreach (var o in new Option[] { modelDir, method, rank, alpha, targetsOpt, rslora, dora, bOnly, adapterPerTask, loraDropout, loraInit, chainEvery, virtualTokens, groupCompletions, density, maskSource, regrowEvery, prefixProjection }) c.Options.Add(o);
            }
            else
            {
                c.Options.Add(config);
                c.Options.Add(tokenizerDir);
            }

            c.SetAction(r => Commands.Train(r.GetValue(deviceOption), finetune ? r.GetValue(modelDir) : null, finetune ? null : r.GetValue(config),
                finetune ? r.GetValue(method)! : "full", r.GetValue(data)!, new PeftSharp.Training.TrainOptions
                {
                    Steps = Positive("--steps", r.GetValue(steps)),
                    BatchSize = Positive("--batch-size", r.GetValue(batch)),
                    SeqLen = Positive("--seq-len", r.GetValue(seqLen)),
                    LearningRate = r.GetValue(lr) > 0 ? r.GetValue(lr) : throw new ArgumentException($"--lr {r.GetValue(lr)}: must be positive"),
                    Seed = r.GetValue(seed),
                    CheckpointEvery = r.GetValue(ckptEvery),
                    WarmupSteps = Math.Min(20, r.GetValue(steps) / 10),
                    CompletionOnly = finetune,
                    ClipNorm = r.GetValue(clip),
                    ClipPerParameter = r.GetValue(clipPer),
                    GradAccumulation = Positive("--grad-accum", r.GetValue(accum)),
                    ChainEvery = finetune ? r.GetValue(chainEvery) : 0,
                    GroupCompletions = finetune && r.GetValue(groupCompletions),
                }, r.GetValue(outDir)!, r.GetValue(resume), r.GetValue(quiet), stdout, new TrainExtras
                {
                    Freeze = r.GetValue(freeze) ?? Array.Empty<string>(),
                    LayerDecay = r.GetValue(layerDecay),
                    EmaDecay = r.GetValue(emaDecay),
                    Optimizer = r.GetValue(optimizerKind)!,
                    Momentum = r.GetValue(momentum),
                    Lora = finetune && r.GetValue(method) == "lora"
                        ? Commands.LoraConfigFrom(r.GetValue(rank), r.GetValue(alpha), r.GetValue(targetsOpt)!, r.GetValue(rslora)) with { UseDora = r.GetValue(dora), LoraDropout = r.GetValue(loraDropout) }
                        : null,
                    LoraInit = finetune ? r.GetValue(loraInit) ?? "lora" : "lora",
                    LoraBOnly = finetune && r.GetValue(bOnly),
                    AdapterPerTask = finetune && r.GetValue(adapterPerTask),
                    VirtualTokens = finetune ? r.GetValue(virtualTokens) : 0,
                    PrefixProjection = finetune ? r.GetValue(prefixProjection) : 0,
                    Density = finetune ? r.GetValue(density) : 0,
                    MaskSource = finetune ? r.GetValue(maskSource) ?? "gradient" : "gradient",
                    RegrowEvery = finetune ? r.GetValue(regrowEvery) : 0,
                    TokenizerDir = finetune ? null : r.GetValue(tokenizerDir),
                }));
            return c;
        }

        root.Subcommands.Add(TrainCommand("pretrain", "Pre-train a model from scratch.", finetune: false));
        root.Subcommands.Add(TrainCommand("finetune", "Fine-tune a model folder (loss on completions).", finetune: true));

        var eval = new Command("eval", "Loss, perplexity and exact-match accuracy on held-out data.");
        foreach (var o in new Option[] { deviceOption, modelDir, data, seqLen, seed }) eval.Options.Add(o);
        eval.SetAction(r => Commands.Eval(r.GetValue(deviceOption), r.GetValue(modelDir)!, r.GetValue(data)!, r.GetValue(seqLen), r.GetValue(seed), stdout));
        root.Subcommands.Add(eval);

        var prompt = new Option<string?>("--prompt") { Description = "One prompt (or give --requests)" };
        var requestsOpt = new Option<string?>("--requests") { Description = "JSONL of requests {\"prompt\", \"variant\"|\"adapter\", \"max_tokens\", ...}, all served in one batch" };
        var adaptersOpt = new Option<string[]>("--adapters") { Description = "Named PEFT adapters (LoRA or prefix tuning): name=DIR,name=DIR (requests pick one by name)", AllowMultipleArgumentsPerToken = true };
        var prefixAdapter = new Option<string?>("--prefix") { Description = "A PEFT prefix-tuning folder whose virtual tokens every request reads" };
        var noSharing = new Option<bool>("--no-prefix-sharing") { Description = "Run every request over its own copy of common prompt prefixes (for comparison)" };
        var deltasOpt = new Option<string[]>("--deltas") { Description = "Named 1-bit (peft compress) or sparse delta folders: name=DIR,name=DIR", AllowMultipleArgumentsPerToken = true };
        var maxTokens = new Option<int?>("--max-tokens") { Description = "default: generation_config.json's max_new_tokens, else 32" };
        var temperature = new Option<float?>("--temperature") { Description = "0 is greedy (default: generation_config.json, else greedy)" };
        var topK = new Option<int?>("--top-k") { Description = "0 keeps all" };
        var topP = new Option<float?>("--top-p") { Description = "nucleus mass in (0, 1]" };
        var generate = new Command("generate", "Generate a completion of --prompt, or of every request in --requests in one mixed-variant batch.");
        foreach (var o in new Option[] { deviceOption, modelDir, prompt, requestsOpt, adaptersOpt, deltasOpt, prefixAdapter, noSharing, maxTokens, temperature, topK, topP, seed }) generate.Options.Add(o);
        generate.SetAction(r => Commands.Generate(r.GetValue(deviceOption), r.GetValue(modelDir)!, r.GetValue(prompt), r.GetValue(requestsOpt),
            r.GetValue(adaptersOpt) ?? Array.Empty<string>(), r.GetValue(deltasOpt) ?? Array.Empty<string>(), r.GetValue(prefixAdapter), r.GetValue(noSharing), r.GetValue(maxTokens), r.GetValue(temperature), r.GetValue(topK), r.GetValue(topP), r.GetValue(seed), stdout, stderr));
        root.Subcommands.Add(generate);

        var tokens = new Option<string>("--tokens") { Description = "Comma-separated token ids", Required = true };
        var logits = new Command("logits", "Print the last position's logits as JSON (for checks against other implementations).");
        foreach (var o in new Option[] { deviceOption, modelDir, tokens }) logits.Options.Add(o);
        logits.SetAction(r => Commands.Logits(r.GetValue(deviceOption), r.GetValue(modelDir)!, r.GetValue(tokens)!, stdout));
        root.Subcommands.Add(logits);

        var text = new Option<string?>("--text") { Description = "Text to encode" };
        var decodeIds = new Option<string?>("--decode") { Description = "Comma-separated token ids to decode" };
        var tokenize = new Command("tokenize", "Encode text (or decode ids) with a model folder's tokenizer and print JSON (for checks against other implementations).");
        foreach (var o in new Option[] { modelDir, text, decodeIds }) tokenize.Options.Add(o);
        tokenize.SetAction(r => Commands.Tokenize(r.GetValue(modelDir)!, r.GetValue(text), r.GetValue(decodeIds), stdout));
        root.Subcommands.Add(tokenize);

        var adapterDir = new Option<string?>("--adapter") { Description = "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)" };
        var deltaDir = new Option<string?>("--delta") { Description = "1-bit delta (peft compress) or sparse delta folder" };
        var mergeConfig = new Option<string?>("--config") { Description = "A mergekit config (YAML or JSON): linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties" };
        var mergeModel = new Option<string?>("--model") { Description = "Hugging Face model folder (not with --config, which names its models)" };
        var merge = new Command("merge", "Merge a PEFT LoRA adapter, a 1-bit or sparse delta into a model, or several models by a mergekit config; writes a Hugging Face folder.");
        foreach (var o in new Option[] { deviceOption, mergeModel, adapterDir, deltaDir, mergeConfig, outDir }) merge.Options.Add(o);
        merge.SetAction(r => Commands.Merge(r.GetValue(deviceOption), r.GetValue(mergeModel), r.GetValue(adapterDir), r.GetValue(deltaDir), r.GetValue(mergeConfig), r.GetValue(outDir)!, stdout));

        var baseDir = new Option<string>("--base") { Description = "The base model folder", Required = true };
        var fineDir = new Option<string>("--finetuned") { Description = "The fine-tuned model folder", Required = true };
        var distillSteps = new Option<int>("--distill-steps") { Description = "Scale distillation steps (0 keeps the mean |delta| scales)", DefaultValueFactory = _ => 100 };
        var distillLr = new Option<float>("--distill-lr") { Description = "Scale distillation step, relative to each scale", DefaultValueFactory = _ => 0.02f };
        var calib = new Option<string>("--calib") { Description = "Calibration text: builtin:tasks | builtin:tasks=NAME | FILE.jsonl | FILE.txt", DefaultValueFactory = _ => "builtin:tasks" };
        var rounds = new Option<int>("--rounds") { Description = "Residual rounds (k sign matrices and k scales per weight)", DefaultValueFactory = _ => 1 };
        var compress = new Command("compress", "Compress a fine-tune to 1-bit deltas over its base (BitDelta), with scale distillation.");
        foreach (var o in new Option[] { deviceOption, baseDir, fineDir, outDir, distillSteps, distillLr, calib, rounds, batch, seqLen, seed }) compress.Options.Add(o);
        compress.SetAction(r => Commands.Compress(r.GetValue(deviceOption), r.GetValue(baseDir)!, r.GetValue(fineDir)!, r.GetValue(outDir)!, r.GetValue(distillSteps),
            r.GetValue(distillLr), r.GetValue(calib)!, r.GetValue(rounds), r.GetValue(batch), r.GetValue(seqLen), r.GetValue(seed), stdout));
        root.Subcommands.Add(compress);

        var budget = new Option<double>("--budget") { Description = "Fraction of all parameters to graft (e.g. 0.001)", DefaultValueFactory = _ => 0.001 };
        var localizeSteps = new Option<int>("--steps") { Description = "Mask optimisation steps", DefaultValueFactory = _ => 30 };
        var localizeData = new Option<string>("--data") { Description = "The fine-tune's task data (builtin:tasks=NAME | FILE.jsonl)", DefaultValueFactory = _ => "builtin:tasks" };
        var localize = new Command("localize", "Skill localization: find the few fine-tuned entries that, grafted onto the base, keep the fine-tune's task performance; writes a sparse delta.");
        foreach (var o in new Option[] { deviceOption, baseDir, fineDir, outDir, budget, localizeSteps, localizeData, batch, seqLen, seed }) localize.Options.Add(o);
        localize.SetAction(r => Commands.Localize(r.GetValue(deviceOption), r.GetValue(baseDir)!, r.GetValue(fineDir)!, r.GetValue(outDir)!, r.GetValue(budget),
            r.GetValue(localizeSteps), r.GetValue(localizeData)!, r.GetValue(batch), r.GetValue(seqLen), r.GetValue(seed), stdout));
        root.Subcommands.Add(localize);
        root.Subcommands.Add(merge);

        var qsOut = new Option<string>("--out") { Description = "Output folder", DefaultValueFactory = _ => "peft-quickstart" };
        var qsPre = new Option<int>("--pretrain-steps") { DefaultValueFactory = _ => 3000 };
        var qsFine = new Option<int>("--finetune-steps") { DefaultValueFactory = _ => 600 };
        var quickstart = new Command("quickstart", "The main job on built-in data: pretrain a tiny model, fine-tune it on a held-out task, evaluate before and after.");
        foreach (var o in new Option[] { deviceOption, qsOut, qsPre, qsFine, seed, quiet }) quickstart.Options.Add(o);
        quickstart.SetAction(r => Commands.Quickstart(r.GetValue(deviceOption), r.GetValue(qsOut)!, Positive("--pretrain-steps", r.GetValue(qsPre)),
            Positive("--finetune-steps", r.GetValue(qsFine)), r.GetValue(seed), r.GetValue(quiet), stdout));
        root.Subcommands.Add(quickstart);

        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            foreach (var e in parse.Errors) stderr.WriteLine($"peft: {e.Message}");
            return 2;
        }

        try
        {
            return parse.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false });
        }
        catch (Exception e) when (e is ArgumentException or FileNotFoundException or InvalidDataException or NotSupportedException or DirectoryNotFoundException)
        {
            stderr.WriteLine($"peft: {e.Message.ReplaceLineEndings(" ")}");
            return 2;
        }
    }

    private static int Positive(string flag, int value) => value > 0 ? value : throw new ArgumentException($"{flag} {value}: must be positive");
}

internal static class Commands
{
    public static int ListDevices(TextWriter stdout)
    {
        var console = Console(stdout);
        var all = Devices.List();
        string auto = Devices.AutoSpec(all);
        var table = new Table().AddColumns("spec", "kind", "name", "memory", "warp", "max group", "detail");
        foreach (var d in all)
        {
            table.AddRow(
                Markup.Escape(d.Spec + (d.Spec == auto ? " (auto)" : "")), d.Kind.ToString(), Markup.Escape(d.Name),
                d.MemoryBytes > 0 ? $"{d.MemoryBytes / (1024.0 * 1024 * 1024):F1} GiB" : "-", d.WarpSize.ToString(), d.MaxGroupSize.ToString(), Markup.Escape(d.Detail));
        }

        console.Write(table);
        foreach (var note in Devices.ProbeNotes) console.MarkupLine($"[grey]not found: {Markup.Escape(note)}[/]");
        console.MarkupLine($"auto picks [bold]{Markup.Escape(auto)}[/]");
        return 0;
    }

    public static int SelfCheck(string? spec, TextWriter stdout, TextWriter stderr)
    {
        var console = Console(stdout);
        string? chosen = spec is { Length: > 0 } ? spec : Environment.GetEnvironmentVariable(Devices.EnvironmentVariable);
        var specs = chosen is { Length: > 0 } ? new[] { chosen } : Devices.List().Select(d => d.Spec).ToArray();
        int failed = 0;
        foreach (var s in specs)
        {
            using var device = Devices.Open(s);
            console.MarkupLine($"self-check on [bold]{Markup.Escape(device.Info.Spec)}[/] ({Markup.Escape(device.Info.Name)}; {Markup.Escape(device.Info.Detail)})");
            var results = PeftSharp.Engine.SelfCheck.Run(device);
            var table = new Table().AddColumns("op", "shape", "max error", "tolerance", "time (incl. compile)", "result");
            foreach (var r in results)
            {
                table.AddRow(r.Op, r.Shape, r.MaxError.ToString("G3"), r.Tolerance.ToString("G3"), $"{r.Elapsed.TotalMilliseconds:F1} ms", r.Passed ? "[green]ok[/]" : "[red]FAILED[/]");
            }

        console.Write(table);
            int bad = results.Count(r => !r.Passed);
            if (bad > 0) stderr.WriteLine($"peft: {bad} self-check op(s) failed on {device.Info.Spec}");
            failed += bad;
        }

        console.MarkupLine(failed == 0 ? $"[green]all kernels agree with the references on {specs.Length} device(s)[/]" : "[red]self-check failed[/]");
        return failed == 0 ? 0 : 1;
    }

    private static Device OpenDevice(string? spec) => spec is { Length: > 0 } ? Devices.Open(spec) : Devices.OpenDefault();

    /// <summary>
    /// A model for text commands: its folder's tokenizer.json / tokenizer.model, or the built-in byte tokenizer for
    /// vocab_size 259. The tokenizer is read here, so a folder without a usable one fails before any work starts.
    /// </summary>
    private static LlamaModel LoadTextModel(string folder, Device device)
    {
        const string hint = " (peft logits --tokens works without one)";
        try
        {
            HfTokenizer.CheckFolder(folder, HuggingFaceFolder.ReadConfig(folder).VocabSize);
        }
        catch (NotSupportedException e)
        {
            throw new NotSupportedException(e.Message + hint, e);
        }

        var model = HuggingFaceFolder.Load(folder, device);
        try
        {
            _ = model.Tokenizer;
        }
        catch (InvalidOperationException e)
        {
            model.Dispose();
            throw new NotSupportedException($"{folder}: {e.Message}{hint}", e);
        }
        catch
        {
            model.Dispose();
            throw;
        }

        return model;
    }

    public static int Train(string? deviceSpec, string? modelDir, string? configSpec, string method, string dataSpec, TrainOptions options, string outDir, string? resume, bool quiet, TextWriter stdout, TrainExtras extras)
    {
        if (method is not ("full" or "lora" or "prefix" or "sparse"))
        {
            throw new ArgumentException($"--method {method}: use full, lora, prefix or sparse (1-bit deltas come from peft compress)");
        }

        if (method != "sparse" && (extras.Density != 0 || extras.MaskSource != "gradient" || extras.RegrowEvery != 0)) throw new ArgumentException("--density, --mask and --regrow-every apply to --method sparse");
        if (extras.RegrowEvery < 0) throw new ArgumentException($"--regrow-every {extras.RegrowEvery}: must be >= 0");

        if (method != "prefix" && (extras.VirtualTokens != 0 || extras.PrefixProjection != 0)) throw new ArgumentException("--virtual-tokens and --prefix-projection apply to --method prefix");
        if (extras.PrefixProjection < 0) throw new ArgumentException($"--prefix-projection {extras.PrefixProjection}: must be >= 0");

        bool loraOnlyFlags = extras.LoraBOnly || extras.LoraInit != "lora" || options.ChainEvery != 0;
        if (extras.Lora == null && loraOnlyFlags) throw new ArgumentException("--b-only, --init and --chain-every apply to --method lora");
        if (options.ChainEvery < 0) throw new ArgumentException($"--chain-every {options.ChainEvery}: must be >= 0");
        var console = Console(stdout);
        using var device = OpenDevice(deviceSpec);
        var (train, held, completionOnly) = Jobs.Data(dataSpec, options.Seed);
        options = options with { CompletionOnly = options.CompletionOnly || completionOnly };
        using var model = resume != null ? LoadTextModel(resume, device)
            : modelDir != null ? LoadTextModel(modelDir, device)
            : NewModel(device, configSpec!, extras.TokenizerDir, options.Seed);
        var jobs = new Jobs(console, quiet);
        console.MarkupLine($"{(modelDir == null ? "pre-training" : "fine-tuning")} {model.ParameterCount:N0} parameters on [bold]{Markup.Escape(device.Info.Spec)}[/], data {Markup.Escape(dataSpec)}, {options.Steps} steps");
        Action<string>? save = null;
        if (method == "sparse")
        {
            double d = extras.Density == 0 ? 0.01 : extras.Density;
            if (d is <= 0 or > 1) throw new ArgumentException($"--density {d}: must be in (0, 1]");
            var source = extras.MaskSource switch
            {
                "gradient" => MaskSource.Gradient,
                "weight" => MaskSource.Weight,
                "random" => MaskSource.Random,
                _ => throw new ArgumentException($"--mask {extras.MaskSource}: use gradient, weight or random"),
            };
            // A resumed run takes its masks from the checkpoint and its starting weights from --model (the delta's base).
            if (resume != null && modelDir == null) throw new ArgumentException("--resume with --method sparse needs --model: the sparse delta is taken against that base");
            var masks = resume != null
                ? SparseState.ReadMasks(resume)
                : SparseMasks.Select(model, d, source, options.Seed, train.EncodeBatches(model.Tokenizer, 4, options.BatchSize, options.SeqLen, options.CompletionOnly, rewind: true), options.BatchSize);
            extras = extras with { SparseMasks = masks };
            long nnz = masks.Values.Sum(m => (long)m.Length);
            console.MarkupLine($"sparse fine-tuning: {nnz:N0} of {model.ParameterCount:N0} entries train ({100.0 * nnz / model.ParameterCount:F2}%, masks by {(resume != null ? "the checkpoint" : extras.MaskSource)}); optimizer state {2 * nnz:N0} floats");
            Dictionary<string, float[]> initial;
            if (resume == null)
            {
                initial = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
            }
            else
            {
                using var baseModel = HuggingFaceFolder.Load(modelDir!, device);
                initial = baseModel.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
            }

            save = dir =>
            {
                using var start = LlamaModel.FromTensors(model.Device, model.Config, (name, _) => initial[name]);
                SparseDelta.Between(start, model, jobs.LastMasks ?? masks).Save(dir, model.Config); // masks move under --regrow-every
            };
        }

        if (method == "prefix")
        {
            int tokens = extras.VirtualTokens == 0 ? 8 : extras.VirtualTokens;
            if (tokens < 0) throw new ArgumentException($"--virtual-tokens {tokens}: must be positive");
            model.AddPrefixTuning(tokens, options.Seed, projectionHidden: extras.PrefixProjection);
            long trainable = model.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
            string through = extras.PrefixProjection > 0 ? $" through a {extras.PrefixProjection}-wide MLP (exported as the keys and values it computes)" : "";
            console.MarkupLine($"prefix tuning: {tokens} virtual tokens per layer{through}, {trainable:N0} trainable parameters ({100.0 * trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})");
            save = dir => PeftPrefixAdapter.From(model, Path.GetFullPath(modelDir!)).Save(dir, model.Config);
        }

        if (extras.Lora is { } lora)
        {
            if (lora.LoraDropout is < 0f or >= 1f) throw new ArgumentException($"--dropout {lora.LoraDropout}: must be in [0, 1)");
            if (extras.LoraInit is not ("lora" or "lora-ga")) throw new ArgumentException($"--init {extras.LoraInit}: use lora or lora-ga");
            if (extras.LoraInit == "lora-ga" && (lora.UseDora || extras.LoraBOnly)) throw new NotSupportedException("--init lora-ga combines with neither --dora nor --b-only");
            var named = lora with { BaseModelNameOrPath = Path.GetFullPath(modelDir!) };
            if (extras.AdapterPerTask)
            {
                if (extras.LoraInit != "lora" || extras.LoraBOnly || lora.UseDora || options.ChainEvery > 0 || options.GroupCompletions)
                {
                    throw new NotSupportedException("--adapter-per-task trains plain LoRA (with --rank, --alpha, --targets, --rslora, --dropout); not with --dora, --b-only, --init lora-ga, --chain-every or --group-completions");
                }

                var tasks = Jobs.TaskNames(dataSpec);
                for (int k = 0; k < tasks.Count; k++) model.AddLoraSet(tasks[k], named, unchecked(options.Seed + 7919 * k));
                long perTask = model.LoraSets[0].Layers.Values.Sum(l => (long)(l.A.Value.Length + l.B.Value.Length));
                console.MarkupLine($"LoRA r = {lora.R}, alpha = {lora.LoraAlpha}: one adapter per task ({string.Join(", ", tasks)}), {perTask:N0} parameters each, all in the same batches over the frozen base");
                save = dir =>
                {
                    foreach (var task in tasks) model.ExportLoraSet(task).Save(Path.Combine(dir, task), model.Config);
                };
                jobs.Train(model, train, options, outDir, "finetune", resume, extras, save);
                foreach (var task in tasks)
                {
                    using var alone = LlamaModel.FromTensors(model.Device, model.Config, (n, _) => model[n].Value.ToArray());
                    alone.UseTokenizerFiles(modelDir!, model.TokenizerFiles);
                    alone.AddLora(named, options.Seed, from: model.ExportLoraSet(task));
                    var taskHeld = held.Where(e => e.Task == task).ToList();
                    if (taskHeld.Count > 0) jobs.PrintEval($"held-out '{task}' through its adapter", Evaluator.Evaluate(alone, taskHeld, options.SeqLen, options.CompletionOnly));
                }

                console.MarkupLine($"PEFT adapters {string.Join(", ", tasks.Select(t => Markup.Escape(Path.Combine(Path.GetFullPath(outDir), t))))}, metrics.jsonl and loss.svg written to [bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
                return 0;
            }

            if (extras.LoraInit == "lora-ga" && resume == null)
            {
                var batches = train.EncodeBatches(model.Tokenizer, 4, options.BatchSize, options.SeqLen, options.CompletionOnly, rewind: true);
                LoraGa.AddLora(model, named, batches, options.BatchSize, options.Seed);
            }
            else
            {
                model.AddLora(named, options.Seed, trainA: !extras.LoraBOnly);
            }

            long trainable = model.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
            string kind = $"{(lora.UseDora ? "DoRA" : "LoRA")} r = {lora.R}, alpha = {lora.LoraAlpha}{(lora.UseRsLora ? " (rsLoRA)" : "")}{(extras.LoraBOnly ? ", B only" : "")}{(extras.LoraInit == "lora-ga" ? ", LoRA-GA init" : "")}{(lora.LoraDropout > 0 ? $", dropout {lora.LoraDropout}" : "")}{(options.ChainEvery > 0 ? $", chained every {options.ChainEvery} steps" : "")}";
            console.MarkupLine($"{Markup.Escape(kind)} on {model.Lora.Count} modules: {trainable:N0} trainable parameters ({100.0 * trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})");
            save = options.ChainEvery > 0
                ? dir =>
                {
                    model.MergeLoraAndRestart(options.Seed);
                    HuggingFaceFolder.Save(model, dir);
                }
                : dir => model.ExportLora(named).Save(dir, model.Config);
        }

        var metrics = jobs.Train(model, train, options, outDir, modelDir == null ? "pretrain" : "finetune", resume, extras, save);
        if (held.Count > 0) jobs.PrintEval("held-out", Evaluator.Evaluate(model, held, options.SeqLen, options.CompletionOnly));
        console.MarkupLine($"{(method == "sparse" ? "sparse delta (sparse_config.json, sparse_delta.safetensors)" : (extras.Lora != null && options.ChainEvery == 0) || method == "prefix" ? "PEFT adapter (adapter_config.json, adapter_model.safetensors)" : "model")}, metrics.jsonl and loss.svg written to [bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
        return 0;
    }

    public static int Eval(string? deviceSpec, string modelDir, string dataSpec, int seqLen, int seed, TextWriter stdout)
    {
        var console = Console(stdout);
        using var device = OpenDevice(deviceSpec);
        using var model = LoadTextModel(modelDir, device);
        var (_, held, _) = Jobs.Data(dataSpec, seed);
        // Examples with a prompt (every built-in task, JSONL prompt/completion) are scored on their completions, as
        // fine-tuning trains them and as the quickstart reports them; plain text on every token. Built-in tasks had
        // been scored on every token, prompt included: 6.68 against the quickstart's 4.86 for the same model and task.
        bool completionOnly = held.Any(e => e.Prompt.Length > 0);
        new Jobs(console, true).PrintEval($"{dataSpec} ({(completionOnly ? "loss on completions" : "loss on every token")})", Evaluator.Evaluate(model, held, seqLen, completionOnly));
        return 0;
    }

    public static int Generate(string? deviceSpec, string modelDir, string? prompt, string? requestsPath, string[] adapters, string[] deltas, string? prefixDir, bool noSharing, int? maxTokens,
        float? temperature, int? topK, float? topP, int seed, TextWriter stdout, TextWriter stderr)
    {
        if ((prompt == null) == (requestsPath == null)) throw new ArgumentException("generate: give either --prompt or --requests");
        var named = RequestFile.ParseNamedFolders("--adapters", adapters);
        var namedDeltas = RequestFile.ParseNamedFolders("--deltas", deltas);
        using var device = OpenDevice(deviceSpec);
        using var model = LoadTextModel(modelDir, device);
        if (prefixDir != null)
        {
            var pa = PeftPrefixAdapter.Load(prefixDir, model.Config);
            model.AddPrefixTuning(pa.VirtualTokens, seed, pa.Keys, pa.Values);
        }

        // Flags win; then the folder's generation_config.json; then greedy, 32 tokens.
        var g = GenerationConfig.Read(modelDir);
        int max = maxTokens ?? g.MaxNewTokens ?? 32;
        float temp = temperature ?? (g.DoSample == false ? 0f : g.Temperature ?? 0f);
        int k = topK ?? g.TopK ?? 0;
        float p = topP ?? g.TopP ?? 1f;
        if (max <= 0) throw new ArgumentException($"--max-tokens {max}: must be positive");
        if (temp < 0) throw new ArgumentException($"--temperature {temp}: must be >= 0");
        if (p is <= 0 or > 1) throw new ArgumentException($"--top-p {p}: must be in (0, 1]");
        var defaults = new GenerationRequest("", null, max, temp, k, p, seed);
        if (prompt != null && named.Count + namedDeltas.Count == 0 && !noSharing)
        {
            stdout.WriteLine(Generator.Sample(model, prompt, max, temp, k, p, seed));
            return 0;
        }

        using var set = new VariantSet(model);
        foreach (var (name, folder) in named)
        {
            bool prefixTuning = JsonConfigFile.Read(folder, PeftLoraAdapter.ConfigFile, "PEFT adapter")["peft_type"]?.GetValue<string>() == "PREFIX_TUNING";
            if (prefixTuning) set.AddPrefix(name, PeftPrefixAdapter.Load(folder, model.Config));
            else set.AddLora(name, PeftLoraAdapter.Load(folder, model.Config));
        }
        foreach (var (name, folder) in namedDeltas)
        {
            if (File.Exists(Path.Combine(folder, SparseDelta.ConfigFile))) set.AddSparse(name, SparseDelta.Load(folder, model));
            else set.AddDelta(name, BitDelta.Load(folder, model));
        }
        var requests = requestsPath != null ? RequestFile.Read(requestsPath, defaults) : new[] { defaults with { Prompt = prompt! } };
        foreach (var r in requests) set.IndexOf(r.Variant); // every name resolves before any work
        var watch = System.Diagnostics.Stopwatch.StartNew();
        var (results, sharing) = BatchGenerator.GenerateWithReport(model, requests, set, noSharing ? PrefixSharing.Off : PrefixSharing.Auto);
        watch.Stop();
        if (requestsPath == null)
        {
            stdout.WriteLine(results[0].Completion);
            return 0;
        }

        for (int i = 0; i < results.Count; i++)
        {
            var line = new System.Text.Json.Nodes.JsonObject
            {
                ["index"] = i,
                ["variant"] = results[i].Request.Variant ?? "base",
                ["prompt"] = results[i].Request.Prompt,
                ["completion"] = results[i].Completion,
                ["tokens"] = results[i].Tokens,
            };
            stdout.WriteLine(line.ToJsonString());
        }

        int total = results.Sum(r => r.Tokens);
        stderr.WriteLine($"{results.Count} requests over {requests.Select(r => r.Variant ?? "base").Distinct().Count()} variants in one batch: {total} tokens in {watch.Elapsed.TotalSeconds:F2} s ({total / Math.Max(watch.Elapsed.TotalSeconds, 1e-9):F0} tokens/s); " +
            (sharing.Prefixes > 0 ? $"{sharing.Prefixes} shared prefixes read by {sharing.SharingSequences} requests, {sharing.TokensSaved} prefix tokens not recomputed" : "no shared prefixes"));
        return 0;
    }

    public static int Logits(string? deviceSpec, string modelDir, string tokenList, TextWriter stdout)
    {
        var ids = tokenList.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(t => int.TryParse(t, out int v) ? v : throw new ArgumentException($"--tokens: '{t}' is not a token id")).ToArray();
        if (ids.Length == 0) throw new ArgumentException("--tokens: no token ids given");
        using var device = OpenDevice(deviceSpec);
        using var model = HuggingFaceFolder.Load(modelDir, device);
        var bad = ids.Where(t => t < 0 || t >= model.Config.VocabSize).ToArray();
        if (bad.Length > 0) throw new ArgumentException($"--tokens: ids {string.Join(", ", bad)} are outside the vocabulary [0, {model.Config.VocabSize})");
        var logits = model.Logits(ids, batch: 1);
        var last = logits.AsSpan((ids.Length - 1) * model.Config.VocabSize, model.Config.VocabSize).ToArray();
        stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(last));
        return 0;
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

    public static int Tokenize(string modelDir, string? text, string? decode, TextWriter stdout)
    {
        if ((text == null) == (decode == null)) throw new ArgumentException("tokenize: give exactly one of --text and --decode");
        var tok = HfTokenizer.ForFolder(modelDir, HuggingFaceFolder.ReadConfig(modelDir).VocabSize);
        if (text != null)
        {
            stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(new { tokenizer = tok.Name, ids = tok.Encode(text), bos = tok.Bos, eos = tok.Eos, pad = tok.Pad }));
            return 0;
        }

        var ids = decode!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(t => int.TryParse(t, out int v) && v >= 0 && v < tok.VocabSize ? v : throw new ArgumentException($"--decode: '{t}' is not a token id of {tok.Name} (0 .. {tok.VocabSize - 1})")).ToArray();
        stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(new { tokenizer = tok.Name, text = tok.Decode(ids) }));
        return 0;
    }

    public static LoraAdapterConfig LoraConfigFrom(int rank, float alpha, string targets, bool rsLora)
    {
        if (rank <= 0) throw new ArgumentException($"--rank {rank}: must be positive");
        if (alpha <= 0) throw new ArgumentException($"--alpha {alpha}: must be positive");
        var list = targets.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        if (targets != "all-linear")
        {
            var unknown = list.Where(t => !LoraAdapterConfig.LlamaLinear.Contains(t)).ToList();
            if (unknown.Count > 0 || list.Length == 0) throw new ArgumentException($"--targets {targets}: use all-linear or names from {string.Join(", ", LoraAdapterConfig.LlamaLinear)} (unknown: {string.Join(", ", unknown)})");
        }

        return new LoraAdapterConfig
        {
            R = rank, LoraAlpha = alpha, UseRsLora = rsLora,
            TargetRegex = targets == "all-linear" ? "all-linear" : null,
            TargetModules = targets == "all-linear" ? Array.Empty<string>() : list,
        };
    }

    public static int Merge(string? deviceSpec, string? modelDir, string? adapterDir, string? deltaDir, string? configPath, string outDir, TextWriter stdout)
    {
        if (new[] { adapterDir, deltaDir, configPath }.Count(x => x != null) != 1) throw new ArgumentException("merge: give one of --adapter, --delta or --config");
        using var device = OpenDevice(deviceSpec);
        if (configPath != null)
        {
            if (modelDir != null) throw new ArgumentException("merge --config: the config names its models (base_model, models); drop --model");
            var config = MergeConfig.Load(configPath);
            using var merged = MergeRunner.Run(config, Path.GetDirectoryName(Path.GetFullPath(configPath))!, device);
            HuggingFaceFolder.Save(merged, outDir, MergeRunner.Storage(config));
            string lines = config.LinesAlpha is float a ? $", LiNeS layer scaling {a} -> {config.LinesBeta}" : "";
            stdout.WriteLine($"merged {config.Models.Count} models by {MergeConfig.Methods.First(m => m.Value == config.Method).Key}{lines} into {Path.GetFullPath(outDir)} ({config.Dtype})");
            return 0;
        }

        if (modelDir == null) throw new ArgumentException("merge: --model is required with --adapter or --delta");
        using var model = HuggingFaceFolder.Load(modelDir, device);
        string what = adapterDir != null
            ? MergeRunner.ApplyFolder(model, adapterDir, adapters: true, deltas: false)
            : MergeRunner.ApplyFolder(model, deltaDir!, adapters: false, deltas: true);

        HuggingFaceFolder.Save(model, outDir);
        CopyModelExtras(modelDir, outDir);
        stdout.WriteLine($"merged {what} into {Path.GetFullPath(outDir)}");
        return 0;
    }

    private static void CopyModelExtras(string from, string to)
    {
        foreach (var extra in new[] { "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json" })
        {
            string src = Path.Combine(from, extra);
            if (File.Exists(src)) File.Copy(src, Path.Combine(to, extra), overwrite: true);
        }
    }

    /// <summary>Calibration batches of (batch, seqLen) tokens from a data spec: the first <paramref name="evalBatches"/> are held out.</summary>
    internal static (List<int[]> Train, List<int[]> Eval) CalibrationBatches(ITokenizer tokenizer, string spec, int batchSize, int seqLen, int trainBatches, int evalBatches, int seed)
    {
        var (source, _, _) = Jobs.Data(spec, seed);
        var all = source.EncodeBatches(tokenizer, trainBatches + evalBatches, batchSize, seqLen, completionOnly: false, rewind: false).Select(b => b.Tokens).ToList();
        return (all.Skip(evalBatches).ToList(), all.Take(evalBatches).ToList());
    }

    public static int Compress(string? deviceSpec, string baseDir, string fineDir, string outDir, int distillSteps, float distillLr, string calib, int rounds,
        int batchSize, int seqLen, int seed, TextWriter stdout)
    {
        if (distillSteps < 0) throw new ArgumentException($"--distill-steps {distillSteps}: must be >= 0");
        if (distillLr <= 0) throw new ArgumentException($"--distill-lr {distillLr}: must be positive");
        if (rounds < 1) throw new ArgumentException($"--rounds {rounds}: must be at least 1");
        using var device = OpenDevice(deviceSpec);
        using var baseModel = HuggingFaceFolder.Load(baseDir, device);
        using var fine = HuggingFaceFolder.Load(fineDir, device);
        var delta = BitDelta.Compress(baseModel, fine, rounds);
        var report = new DistillReport(double.NaN, double.NaN, 0, delta);
        if (baseModel.HasTokenizer)
        {
            var (train, eval) = CalibrationBatches(baseModel.Tokenizer, calib, batchSize, seqLen, Math.Min(Math.Max(distillSteps, 1), 64), 4, seed);
            report = ScaleDistillation.Run(delta, baseModel, fine, train, eval, batchSize, distillSteps, distillLr);
        }
        else if (distillSteps > 0)
        {
            throw new NotSupportedException($"--distill-steps {distillSteps}: calibration text needs a tokenizer, and {baseDir} has no {HfTokenizer.JsonFile} or {HfTokenizer.SentencePieceFile} (vocab_size {baseModel.Config.VocabSize}). Use --distill-steps 0");
        }

        report.Delta.Save(outDir, baseModel.Config);
        stdout.WriteLine(CompressionSummary(baseModel, report));
        return 0;
    }

    public static int Localize(string? deviceSpec, string baseDir, string fineDir, string outDir, double budget, int steps, string dataSpec, int batchSize, int seqLen, int seed, TextWriter stdout)
    {
        if (budget is <= 0 or > 1) throw new ArgumentException($"--budget {budget}: must be in (0, 1]");
        if (steps < 0) throw new ArgumentException($"--steps {steps}: must be >= 0");
        using var device = OpenDevice(deviceSpec);
        using var baseModel = LoadTextModel(baseDir, device);
        using var fine = LoadTextModel(fineDir, device);
        var (train, held, _) = Jobs.Data(dataSpec, seed);
        var batches = train.EncodeBatches(baseModel.Tokenizer, 8, batchSize, seqLen, completionOnly: true, rewind: false);
        var result = Grafting.Localize(baseModel, fine, batches, batchSize, budget, steps);
        result.Delta.Save(outDir, baseModel.Config);
        result.Delta.ApplyTo(baseModel);
        var grafted = Evaluator.Evaluate(baseModel, held, seqLen);
        var full = Evaluator.Evaluate(fine, held, seqLen);
        stdout.WriteLine($"grafted {result.Entries:N0} entries ({100 * result.Density:F3}% of the model): task loss {result.LossBefore:F4} -> {result.LossAfter:F4} over {steps} mask steps; " +
            $"held-out exact match {grafted.ExactMatch:P1} grafted vs {full.ExactMatch:P1} fine-tuned; sparse delta in {Path.GetFullPath(outDir)}");
        return 0;
    }

    internal static string CompressionSummary(LlamaModel baseModel, DistillReport report)
    {
        var d = report.Delta;
        long linearParams = d.Modules.Keys.Sum(m => (long)baseModel[m + ".weight"].Value.Length);
        double vsFp16 = linearParams * 2.0 / Math.Max(1, d.PackedBytes);
        double wholeFp16 = baseModel.ParameterCount * 2.0 / Math.Max(1, d.PackedBytes + d.DenseBytes);
        string distill = double.IsNaN(report.LogitMseBefore) ? "no calibration" : report.Steps == 0
            ? $"logit MSE {report.LogitMseBefore:E3} (no distillation)"
            : $"logit MSE {report.LogitMseBefore:E3} -> {report.LogitMseAfter:E3} after {report.Steps} distillation steps";
        return $"compressed {d.Modules.Count} linear weights to {d.Rounds} bit{(d.Rounds == 1 ? "" : "s")} per weight: {d.PackedBytes:N0} bytes, {vsFp16:F1}x smaller than fp16 linears; " +
            $"{d.Dense.Count} other tensors kept dense ({d.DenseBytes:N0} bytes); whole variant {wholeFp16:F1}x smaller than an fp16 copy; {distill}";
    }

    public static int Quickstart(string? deviceSpec, string outDir, int pretrainSteps, int finetuneSteps, int seed, bool quiet, TextWriter stdout)
    {
        var console = Console(stdout);
        using var device = OpenDevice(deviceSpec);
        var jobs = new Jobs(console, quiet);
        const string heldOutTask = "reverse";
        var pretrainTasks = TaskSuite.Tasks.Where(t => t != heldOutTask).ToList();
        var options = new TrainOptions { Steps = pretrainSteps, BatchSize = 16, SeqLen = 40, LearningRate = 3e-3f, WarmupSteps = 20, Seed = seed, CheckpointEvery = 0 };
        console.MarkupLine($"[bold]PeftSharp quickstart[/] on {Markup.Escape(device.Info.Spec)} ({Markup.Escape(device.Info.Name)})");
        console.MarkupLine($"1. pre-train a tiny Llama on the built-in tasks [[{string.Join(", ", pretrainTasks)}]], holding out '{heldOutTask}'");
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny, seed);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var pre = jobs.Train(model, ExampleSource.Tasks(pretrainTasks, seed, Split.Train), options, Path.Combine(outDir, "pretrained"), "pretrain", null);
        var preHeld = TaskSuite.Stream(pretrainTasks, seed + 1000, Split.HeldOut).Take(70).ToList();
        var taskHeld = TaskSuite.Stream(new[] { heldOutTask }, seed + 2000, Split.HeldOut).Take(50).ToList();
        var preOnPre = Evaluator.Evaluate(model, preHeld, options.SeqLen);
        var before = Evaluator.Evaluate(model, taskHeld, options.SeqLen);
        console.MarkupLine($"2. full fine-tune on '{heldOutTask}' (loss on completions)");
        var fineOptions = options with { Steps = finetuneSteps, LearningRate = 1e-3f, WarmupSteps = 10, CompletionOnly = true };
        jobs.Train(model, ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train), fineOptions, Path.Combine(outDir, "finetuned-full"), "finetune", null);
        var after = Evaluator.Evaluate(model, taskHeld, options.SeqLen);
        var afterOnPre = Evaluator.Evaluate(model, preHeld, options.SeqLen);
        console.MarkupLine($"3. LoRA fine-tune of the pre-trained model on '{heldOutTask}' (r = 8, all-linear, base frozen)");
        using var loraModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        var loraConfig = LoraConfigFrom(8, 16f, "all-linear", false);
        loraModel.AddLora(loraConfig, seed);
        long loraTrainable = loraModel.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        jobs.Train(loraModel, ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train), fineOptions with { LearningRate = 3e-3f },
            Path.Combine(outDir, "finetuned-lora"), "lora", null, null, dir => loraModel.ExportLora(loraConfig).Save(dir, loraModel.Config));
        var loraAfter = Evaluator.Evaluate(loraModel, taskHeld, options.SeqLen);
        var loraOnPre = Evaluator.Evaluate(loraModel, preHeld, options.SeqLen);
        const int virtualTokens = 32;
        console.MarkupLine($"3b. prefix tuning of the pre-trained model on '{heldOutTask}' ({virtualTokens} virtual tokens per layer, base frozen)");
        using var prefixModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        prefixModel.AddPrefixTuning(virtualTokens, seed);
        long prefixTrainable = prefixModel.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        jobs.Train(prefixModel, ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train), fineOptions with { LearningRate = 5e-2f },
            Path.Combine(outDir, "finetuned-prefix"), "prefix", null, null, dir => PeftPrefixAdapter.From(prefixModel).Save(dir, prefixModel.Config));
        var prefixAfter = Evaluator.Evaluate(prefixModel, taskHeld, options.SeqLen);
        console.MarkupLine($"3c. sparse fine-tune of the pre-trained model on '{heldOutTask}': 1% of each tensor's entries, chosen by gradient magnitude");
        using var sparseModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        var sparseData = ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train);
        var sparseMasks = SparseMasks.Select(sparseModel, 0.01, MaskSource.Gradient, seed,
            sparseData.EncodeBatches(sparseModel.Tokenizer, 4, options.BatchSize, options.SeqLen, completionOnly: true, rewind: true), options.BatchSize);
        long sparseTrainable = sparseMasks.Values.Sum(m => (long)m.Length);
        using (var pretrained = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        {
            jobs.Train(sparseModel, sparseData, fineOptions with { LearningRate = 3e-2f }, Path.Combine(outDir, "finetuned-sparse"), "sparse", null,
                new TrainExtras { SparseMasks = sparseMasks }, dir => SparseDelta.Between(pretrained, sparseModel, sparseMasks).Save(dir, sparseModel.Config));
        }

        var sparseAfter = Evaluator.Evaluate(sparseModel, taskHeld, options.SeqLen);
        console.MarkupLine($"4. compress the full fine-tune to 1-bit deltas over the pre-trained model (BitDelta), then distill the scales");
        using var baseModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        var delta = BitDelta.Compress(baseModel, model);
        var (calibTrain, calibEval) = CalibrationBatches(baseModel.Tokenizer, $"builtin:tasks", 8, options.SeqLen, 32, 4, seed + 11);
        var distilled = ScaleDistillation.Run(delta, baseModel, model, calibTrain, calibEval, 8, steps: 60, learningRate: 0.02f);
        distilled.Delta.Save(Path.Combine(outDir, "finetuned-1bit"), baseModel.Config);
        EvalResult Compressed(BitDelta d)
        {
            using var m = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
            d.MergeInto(m);
            return Evaluator.Evaluate(m, taskHeld, options.SeqLen);
        }

        // Skill localization needs a skill to localize: 'reverse' is new to the pre-trained model, and no 0.1% of a
        // fine-tune holds a new skill in a model this small (measured: 0-8% exact match grafted at 0.1-1%). 'sort' under
        // a tag it has never seen is the paper's setting: the model can sort, the fine-tune connects a new name to it.
        const string renamedTask = "sort@~";
        console.MarkupLine($"4b. skill localization: an SGD fine-tune teaches the pre-trained model 'sort' under a new tag ('{renamedTask}'); " +
            "then 0.1% of its entries, chosen by mask optimisation, are grafted onto the pre-trained model");
        var renamedData = ExampleSource.Tasks(new[] { renamedTask }, seed + 13, Split.Train);
        var renamedHeld = TaskSuite.Stream(new[] { renamedTask }, seed + 2100, Split.HeldOut).Take(50).ToList();
        var renamedBefore = Evaluator.Evaluate(baseModel, renamedHeld, options.SeqLen);
        using var renamedModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        jobs.Train(renamedModel, renamedData, fineOptions with { Steps = Math.Max(1, finetuneSteps / 2), LearningRate = 0.1f },
            Path.Combine(outDir, "finetuned-renamed"), "sgd fine-tune", null, new TrainExtras { Optimizer = "sgd" });
        var renamedAfter = Evaluator.Evaluate(renamedModel, renamedHeld, options.SeqLen);
        var graftBatches = renamedData.EncodeBatches(baseModel.Tokenizer, 8, options.BatchSize, options.SeqLen, completionOnly: true, rewind: false);
        var graft = Grafting.Localize(baseModel, renamedModel, graftBatches, options.BatchSize, budget: 0.001, steps: 100);
        graft.Delta.Save(Path.Combine(outDir, "grafted"), baseModel.Config);
        EvalResult grafted;
        using (var g = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        {
            graft.Delta.ApplyTo(g);
            grafted = Evaluator.Evaluate(g, renamedHeld, options.SeqLen);
        }

        var bitBefore = Compressed(delta);
        var bitAfter = Compressed(distilled.Delta);
        console.WriteLine(CompressionSummary(baseModel, distilled));
        var table = new Table().AddColumns("model", "trainable", "data (held-out examples)", "loss", "exact match");
        string all = $"{model.ParameterCount:N0}";
        table.AddRow("pre-trained", "-", "pre-training tasks", $"{preOnPre.Loss:F3}", $"{preOnPre.ExactMatch:P1}");
        table.AddRow("pre-trained", "-", $"'{heldOutTask}' (unseen task)", $"{before.Loss:F3}", $"{before.ExactMatch:P1}");
        table.AddRow("full fine-tune", all, $"'{heldOutTask}'", $"{after.Loss:F3}", $"{after.ExactMatch:P1}");
        table.AddRow("full fine-tune", all, "pre-training tasks", $"{afterOnPre.Loss:F3}", $"{afterOnPre.ExactMatch:P1}");
        table.AddRow("LoRA r=8", $"{loraTrainable:N0}", $"'{heldOutTask}'", $"{loraAfter.Loss:F3}", $"{loraAfter.ExactMatch:P1}");
        table.AddRow("LoRA r=8", $"{loraTrainable:N0}", "pre-training tasks", $"{loraOnPre.Loss:F3}", $"{loraOnPre.ExactMatch:P1}");
        console.MarkupLine($"5. batched generation: 32 '{heldOutTask}' requests behind one shared few-shot prompt, on the full fine-tune, with and without prefix sharing");
        var shots = string.Concat(TaskSuite.Stream(new[] { heldOutTask }, seed + 3, Split.Train).Take(12).Select(e => e.Prompt + e.Completion + "\n"));
        var shotRequests = taskHeld.Take(32).Select(e => new GenerationRequest(e.Prompt, MaxTokens: ByteTokenizer.Instance.Encode(e.Completion).Length + 1, SharedPrefix: shots)).ToList();
        BatchGenerator.GenerateWithReport(model, shotRequests.Take(2).ToList(), null, PrefixSharing.Told); // warm up both paths
        BatchGenerator.GenerateWithReport(model, shotRequests.Take(2).ToList(), null, PrefixSharing.Off);
        var sharedClock = System.Diagnostics.Stopwatch.StartNew();
        var (sharedOut, sharedReport) = BatchGenerator.GenerateWithReport(model, shotRequests, null, PrefixSharing.Told);
        double sharedSeconds = sharedClock.Elapsed.TotalSeconds;
        var copyClock = System.Diagnostics.Stopwatch.StartNew();
        var (copyOut, _) = BatchGenerator.GenerateWithReport(model, shotRequests, null, PrefixSharing.Off);
        double copySeconds = copyClock.Elapsed.TotalSeconds;
        bool same = sharedOut.Select(r => r.Completion).SequenceEqual(copyOut.Select(r => r.Completion));
        table.AddRow($"prefix tuning ({virtualTokens} tokens)", $"{prefixTrainable:N0}", $"'{heldOutTask}'", $"{prefixAfter.Loss:F3}", $"{prefixAfter.ExactMatch:P1}");
        table.AddRow("sparse fine-tune (1%)", $"{sparseTrainable:N0}", $"'{heldOutTask}'", $"{sparseAfter.Loss:F3}", $"{sparseAfter.ExactMatch:P1}");
        table.AddRow("pre-trained", "-", $"'{renamedTask}' (sort, new tag)", $"{renamedBefore.Loss:F3}", $"{renamedBefore.ExactMatch:P1}");
        table.AddRow("SGD fine-tune", all, $"'{renamedTask}'", $"{renamedAfter.Loss:F3}", $"{renamedAfter.ExactMatch:P1}");
        table.AddRow($"grafted {100 * graft.Density:F1}% of it", $"{graft.Entries:N0}", $"'{renamedTask}'", $"{grafted.Loss:F3}", $"{grafted.ExactMatch:P1}");
        string bits = $"{delta.PackedBytes + delta.DenseBytes:N0} B";
        table.AddRow("1-bit delta of full FT", bits, $"'{heldOutTask}'", $"{bitBefore.Loss:F3}", $"{bitBefore.ExactMatch:P1}");
        table.AddRow("1-bit delta, distilled", bits, $"'{heldOutTask}'", $"{bitAfter.Loss:F3}", $"{bitAfter.ExactMatch:P1}");
        console.Write(table);
        int shotTokens = 1 + ByteTokenizer.Instance.Encode(shots).Length;
        console.MarkupLine($"shared prompt of {shotTokens} tokens, 32 requests: {sharedSeconds * 1000:F0} ms with one shared copy of its keys and values ({sharedReport.TokensSaved:N0} prompt tokens not recomputed), " +
            $"{copySeconds * 1000:F0} ms with a copy per request: [bold]{copySeconds / Math.Max(sharedSeconds, 1e-9):F1}x[/] faster; same tokens: {(same ? "yes" : "[red]NO[/]")}");
        console.MarkupLine($"6. one batch, every variant: 8 held-out '{heldOutTask}' prompts each through the LoRA adapter, the prefix-tuning adapter, the sparse delta, " +
            "the distilled 1-bit delta of the full fine-tune (with its own norms and embedding) and the plain base, all over one copy of the pre-trained weights");
        using (var servingBase = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        using (var variantSet = new VariantSet(servingBase))
        {
            variantSet.AddLora("lora", PeftLoraAdapter.Load(Path.Combine(outDir, "finetuned-lora"), servingBase.Config));
            variantSet.AddPrefix("prefix", PeftPrefixAdapter.Load(Path.Combine(outDir, "finetuned-prefix"), servingBase.Config));
            variantSet.AddSparse("sparse", SparseDelta.Load(Path.Combine(outDir, "finetuned-sparse"), servingBase));
            variantSet.AddDelta("1-bit", BitDelta.Load(Path.Combine(outDir, "finetuned-1bit"), servingBase));
            string[] served = { "lora", "prefix", "sparse", "1-bit", "base" };
            var examples = taskHeld.Take(8).ToList();
            var mixedRequests = examples.SelectMany(e => served.Select(v => new GenerationRequest(e.Prompt, v, MaxTokens: ByteTokenizer.Instance.Encode(e.Completion).Length + 1))).ToList();
            var mixedClock = System.Diagnostics.Stopwatch.StartNew();
            var mixedOut = BatchGenerator.Generate(servingBase, mixedRequests, variantSet);
            double mixedSeconds = mixedClock.Elapsed.TotalSeconds;
            var correct = served.Select((v, k) => examples.Where((e, i) => mixedOut[i * served.Length + k].Completion == e.Completion).Count()).ToArray();

            // The same prompts through each variant on its own (the trained models; the 1-bit delta merged into a copy).
            using var bitMerged = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
            distilled.Delta.MergeInto(bitMerged);
            var alone = new[] { loraModel, prefixModel, sparseModel, bitMerged, servingBase };
            int agree = examples.Select((e, i) => served.Where((v, k) =>
                Generator.Greedy(alone[k], e.Prompt, mixedRequests[i * served.Length + k].MaxTokens) == mixedOut[i * served.Length + k].Completion).Count()).Sum();
            console.MarkupLine($"{mixedRequests.Count} requests over {served.Length} variants in one batch, {mixedSeconds * 1000:F0} ms; exact match per variant: " +
                string.Join(", ", served.Select((v, k) => $"{v} {correct[k]}/{examples.Count}")) + $"; same tokens as each variant run alone: {agree}/{mixedRequests.Count}");
        }

        double tps = pre.Count > 0 ? pre.Skip(pre.Count / 2).Average(m => m.TokensPerSecond) : 0;
        console.MarkupLine($"{model.ParameterCount:N0} parameters; LoRA trains {loraTrainable:N0} ({100.0 * loraTrainable / model.ParameterCount:F1}%); pre-training ran at {tps:F0} tokens/s; total {clock.Elapsed.TotalSeconds:F0} s");
        console.MarkupLine($"models, metrics.jsonl and loss.svg in [bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
        return 0;
    }

    private static IAnsiConsole Console(TextWriter writer)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(writer),
            Ansi = writer == System.Console.Out ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = writer == System.Console.Out ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        if (writer != System.Console.Out || System.Console.IsOutputRedirected) console.Profile.Width = 160;
        return console;
    }
}
