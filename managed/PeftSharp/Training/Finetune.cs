using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Variants;

namespace PeftSharp.Training;

/// <summary>
/// Training recipes as library calls, the ones the <c>peft</c> host runs: <see cref="Prepare"/> sets a model up for a
/// <see cref="FinetuneMethod"/> (adapters, LoRA-GA, adapter sets, prefix tuning, sparse masks) and says what its
/// output is; <see cref="Train"/> runs the loop (optimizer, schedule, EMA, SpIEL regrowth, checkpoints that resume
/// bit-identically), then writes the output, metrics.jsonl and loss.svg.
/// </summary>
public static class Finetune
{
    /// <summary>
    /// Sets <paramref name="model"/> up for <paramref name="options"/>. <paramref name="baseFolder"/> is the folder the
    /// model came from (adapters record it as their base; a resumed sparse run takes its delta against it);
    /// <paramref name="resume"/> a checkpoint folder the run will resume from (LoRA-GA then starts from the
    /// checkpoint's factors, a sparse run from its masks). <paramref name="data"/> gives the batches LoRA-GA and the
    /// gradient mask read (it is rewound afterwards).
    /// </summary>
    public static FinetuneRecipe Prepare(LlamaModel model, FinetuneOptions options, TrainOptions train, ExampleSource data, string? baseFolder = null, string? resume = null)
    {
        options.Validate(train);
        var recipe = new FinetuneRecipe(model, options);
        switch (options.Method)
        {
            case FinetuneMethod.Sparse:
                PrepareSparse(model, options, train, data, baseFolder, resume, recipe);
                break;
            case FinetuneMethod.Prefix:
                model.AddPrefixTuning(options.VirtualTokens, train.Seed, projectionHidden: options.PrefixProjection);
                string through = options.PrefixProjection > 0 ? $" through a {options.PrefixProjection}-wide MLP (exported as the keys and values it computes)" : "";
                recipe.Description = $"prefix tuning: {options.VirtualTokens} virtual tokens per layer{through}, {recipe.Trainable:N0} trainable parameters " +
                    $"({100.0 * recipe.Trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})";
                recipe.Save = dir => PeftPrefixAdapter.From(model, baseFolder == null ? null : Path.GetFullPath(baseFolder)).Save(dir, model.Config);
                recipe.Output = "PEFT adapter (adapter_config.json, adapter_model.safetensors)";
                break;
            case FinetuneMethod.Lora:
                PrepareLora(model, options, train, data, baseFolder, resume, recipe);
                break;
            case FinetuneMethod.Ssf:
                model.AddSsf(LoraAdapterConfig.LlamaLinearModules(model.Config).ToList());
                recipe.Description = $"SSF on {model.Ssf.Count} linear modules (a scale and a shift per output): {recipe.Trainable:N0} trainable parameters " +
                    $"({100.0 * recipe.Trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})";
                recipe.Save = dir => model.ExportSsf().Save(dir, model.Config);
                recipe.Output = "SSF adapter (ssf_config.json, ssf.safetensors)";
                break;
            case FinetuneMethod.Mezo:
                // The parameters are frozen so none allocates a gradient: MeZO moves them itself.
                foreach (var p in model.Parameters) p.Trainable = false;
                recipe.Description = $"MeZO: zeroth-order SGD over all {model.ParameterCount:N0} parameters (eps {options.MezoEpsilon}), two forward passes a step, " +
                    "no gradients or optimizer state";
                break;
            case FinetuneMethod.LnTuning:
                var norms = PeftLnTuningAdapter.TargetsIn(model.Config, PeftLnTuningAdapter.DefaultTargets, null).Select(m => m + ".weight").ToHashSet();
                foreach (var p in model.Parameters) p.Trainable = norms.Contains(p.Name);
                recipe.Description = $"LN tuning: {norms.Count} norm weights train, {recipe.Trainable:N0} parameters ({100.0 * recipe.Trainable / model.ParameterCount:F2}% of " +
                    $"{model.ParameterCount:N0})";
                recipe.Save = dir => new PeftLnTuningAdapter(PeftLnTuningAdapter.DefaultTargets, null, norms.ToDictionary(n => n, n => model[n].Value.ToArray()),
                    baseFolder == null ? null : Path.GetFullPath(baseFolder)).Save(dir, model.Config);
                recipe.Output = "PEFT LN tuning adapter (adapter_config.json, adapter_model.safetensors)";
                break;
            case FinetuneMethod.Ia3:
                var ia3 = new Ia3Config { BaseModelNameOrPath = baseFolder == null ? null : Path.GetFullPath(baseFolder) };
                model.AddIa3(ia3);
                recipe.Description = $"IA3 on {model.Ia3.Count} modules (k_proj, v_proj outputs; down_proj inputs): {recipe.Trainable:N0} trainable parameters " +
                    $"({100.0 * recipe.Trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})";
                recipe.Save = dir => model.ExportIa3(ia3).Save(dir, model.Config);
                recipe.Output = "PEFT IA3 adapter (adapter_config.json, adapter_model.safetensors)";
                break;
        }

        return recipe;
    }

    private static void PrepareSparse(LlamaModel model, FinetuneOptions options, TrainOptions train, ExampleSource data, string? baseFolder, string? resume, FinetuneRecipe recipe)
    {
        // A resumed run takes its masks from the checkpoint and its starting weights from the base folder (the delta's base).
        if (resume != null && baseFolder == null) throw new ArgumentException("resuming a sparse fine-tune needs the base model folder: the sparse delta is taken against that base");
        var masks = resume != null
            ? SparseState.ReadMasks(resume)
            : SparseMasks.Select(model, options.Density, options.MaskSource, train.Seed, data.EncodeBatches(model.Tokenizer, 4, train.BatchSize, train.SeqLen, train.CompletionOnly,
                rewind: true), train.BatchSize);
        recipe.Masks = masks;
        long nnz = masks.Values.Sum(m => (long)m.Length);
        string source = resume != null ? "the checkpoint" : options.MaskSource.ToString().ToLowerInvariant();
        recipe.Description = $"sparse fine-tuning: {nnz:N0} of {model.ParameterCount:N0} entries train ({100.0 * nnz / model.ParameterCount:F2}%, masks by {source}); optimizer state " +
            $"{2 * nnz:N0} floats";
        Dictionary<string, float[]> initial;
        if (resume == null)
        {
            initial = model.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        }
        else
        {
            using var baseModel = HuggingFaceFolder.Load(baseFolder!, model.Device);
            initial = baseModel.Parameters.ToDictionary(p => p.Name, p => p.Value.ToArray());
        }

        recipe.Save = dir =>
        {
            using var start = LlamaModel.FromTensors(model.Device, model.Config, (name, _) => initial[name]);
            SparseDelta.Between(start, model, recipe.FinalMasks ?? masks).Save(dir, model.Config); // masks move under regrowth
        };
        recipe.Output = "sparse delta (sparse_config.json, sparse_delta.safetensors)";
    }

    private static void PrepareLora(LlamaModel model, FinetuneOptions options, TrainOptions train, ExampleSource data, string? baseFolder, string? resume, FinetuneRecipe recipe)
    {
        var lora = options.Lora!;
        var named = baseFolder == null ? lora : lora with { BaseModelNameOrPath = Path.GetFullPath(baseFolder) };
        recipe.Adapter = named;
        if (options.AdapterPerTask is { } tasks)
        {
            for (int k = 0; k < tasks.Count; k++) model.AddLoraSet(tasks[k], named, unchecked(train.Seed + 7919 * k));
            long perTask = model.LoraSets[0].Layers.Values.Sum(l => (long)(l.A.Value.Length + l.B.Value.Length));
            recipe.Description = $"LoRA r = {lora.R}, alpha = {lora.LoraAlpha}: one adapter per task ({string.Join(", ", tasks)}), {perTask:N0} parameters each, all in the same batches " +
                $"over the frozen base";
            recipe.Save = dir =>
            {
                foreach (var task in tasks) model.ExportLoraSet(task).Save(Path.Combine(dir, task), model.Config);
            };
            recipe.Output = $"PEFT adapters ({string.Join(", ", tasks)})";
            return;
        }

        if (options.LoraInit == LoraInit.LoraGa && resume == null)
        {
            var batches = data.EncodeBatches(model.Tokenizer, 4, train.BatchSize, train.SeqLen, train.CompletionOnly, rewind: true);
            LoraGa.AddLora(model, named, batches, train.BatchSize, train.Seed);
        }
        else
        {
            model.AddLora(named, train.Seed, trainA: !options.LoraBOnly);
        }

        string kind = $"{(lora.UseDora ? "DoRA" : "LoRA")} r = {lora.R}, alpha = {lora.LoraAlpha}{(lora.UseRsLora ? " (rsLoRA)" : "")}{(options.LoraBOnly ? ", B only" : "")}" +
            $"{(lora.LoraBias ? ", lora_bias" : "")}" +
            $"{(options.LoraInit == LoraInit.LoraGa ? ", LoRA-GA init" : "")}{(lora.LoraDropout > 0 ? $", dropout {lora.LoraDropout}" : "")}" +
            $"{(train.ChainEvery > 0 ? $", chained every {train.ChainEvery} steps" : "")}";
        recipe.Description = $"{kind} on {model.Lora.Count} modules: {recipe.Trainable:N0} trainable parameters ({100.0 * recipe.Trainable / model.ParameterCount:F2}% of {model.ParameterCount:N0})";
        if (train.ChainEvery > 0)
        {
            recipe.Save = dir =>
            {
                model.MergeLoraAndRestart(train.Seed);
                HuggingFaceFolder.Save(model, dir);
            };
            return;
        }

        recipe.Save = dir => model.ExportLora(named).Save(dir, model.Config);
        recipe.Output = "PEFT adapter (adapter_config.json, adapter_model.safetensors)";
    }

    /// <summary>
    /// A model with one adapter of a set-batched run (<see cref="FinetuneOptions.AdapterPerTask"/>) on a copy of the
    /// base: that task's variant alone (the caller disposes it), with the tokenizer files of
    /// <paramref name="tokenizerFolder"/> when the model has them.
    /// </summary>
    public static LlamaModel WithAdapterOf(LlamaModel model, string task, LoraAdapterConfig config, int seed, string? tokenizerFolder = null)
    {
        var alone = LlamaModel.FromTensors(model.Device, model.Config, (n, _) => model[n].Value.ToArray());
        try
        {
            if (tokenizerFolder != null) alone.UseTokenizerFiles(tokenizerFolder, model.TokenizerFiles);
            alone.AddLora(config, seed, from: model.ExportLoraSet(task));
            return alone;
        }
        catch
        {
            alone.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Trains <paramref name="model"/> on <paramref name="data"/>: the optimizer <paramref name="options"/> names (the
    /// masked AdamW with <paramref name="recipe"/>'s masks for sparse fine-tuning), warmup then cosine to a tenth,
    /// EMA and regrowth when asked, checkpoints in OUT/checkpoint every TrainOptions.CheckpointEvery steps (resumed
    /// from <paramref name="resume"/>). Then writes the output (<paramref name="recipe"/>'s, else
    /// <paramref name="save"/>, else the model as a Hugging Face folder) and loss.svg to <paramref name="outDir"/>.
    /// <paramref name="onStep"/> sees every step; <paramref name="log"/> gets a line for what the run does beside.
    /// Cancelling <paramref name="cancel"/> ends the run at the next step boundary with a checkpoint and a
    /// <see cref="TrainingInterruptedException"/> (no final output).
    /// </summary>
    public static IReadOnlyList<StepMetrics> Train(LlamaModel model, ExampleSource data, TrainOptions train, FinetuneOptions options, string outDir, string title,
        FinetuneRecipe? recipe = null, string? resume = null, Action<StepMetrics>? onStep = null, Action<string>? log = null, Action<string>? save = null,
        CancellationToken cancel = default)
    {
        if (options.Freeze.Count > 0)
        {
            int frozen = ParameterTools.Freeze(model, options.Freeze); // whether or not anyone listens
            log?.Invoke($"froze {frozen} parameter tensors");
        }

        var scale = options.LayerDecay < 1f ? ParameterTools.LayerDecay(model.Config, options.LayerDecay) : (_ => 1f);
        var masks = recipe?.Masks;
        using Optimizer opt = masks != null ? new MaskedAdamW(model.AllParameters, masks, weightDecay: 0f) { LearningRateScale = scale }
            : options.Method == FinetuneMethod.Mezo ? new Mezo(model.Parameters, options.MezoEpsilon, train.Seed) { LearningRateScale = scale }
            : options.Optimizer switch
        {
            OptimizerKind.AdamW => new AdamW(model.AllParameters, weightDecay: train.WeightDecay) { LearningRateScale = scale },
            OptimizerKind.Sgd => new Sgd(model.AllParameters, momentum: options.Momentum, weightDecay: 0f) { LearningRateScale = scale },
            OptimizerKind.GaLore => new GaLoreAdamW(model.AllParameters, options.GaLoreRank, options.GaLoreEvery, weightDecay: train.WeightDecay, seed: train.Seed,
                crossHead: options.GaLoreCrossHead ? GaLoreAdamW.CrossHead(model.Config) : null)
            {
                LearningRateScale = scale,
            },
            _ => throw new ArgumentException($"optimizer {options.Optimizer}: use AdamW, Sgd or GaLore"),
        };
        using var ema = options.EmaDecay > 0 ? new WeightEma(model, options.EmaDecay) : null;
        using var regrow = options.RegrowEvery > 0 && opt is MaskedAdamW masked ? new SparseRegrow(masked, options.RegrowEvery) : null;
        var schedule = new LearningRateSchedule.Warmup(train.LearningRate, train.WarmupSteps, train.Steps, Cosine: true, MinLearningRate: train.LearningRate / 10);
        var run = new TrainingRun(model, opt, schedule, data, train);
        if (ema != null) run.ExtraStates.Add(ema); // the EMA travels in checkpoints and resumes with the run
        if (opt is MaskedAdamW sparse) run.ExtraStates.Add(new SparseState(sparse, regrow)); // masks (and regrow state) too
        if (resume != null) run.Resume(resume);
        var metrics = run.Run(outDir, m =>
        {
            ema?.Update();
            regrow?.AfterStep(m.Step);
            onStep?.Invoke(m);
        }, cancel);
        ema?.CopyToModel(); // the saved (and evaluated) model is the average
        if (regrow != null) log?.Invoke($"SpIEL: {regrow.Regrown:N0} entries dropped and regrown over the run (every {regrow.Every} steps)");
        if (recipe != null && opt is MaskedAdamW final) recipe.FinalMasks = final.Masks;
        var write = recipe?.Save ?? save;
        if (write != null) write(outDir);
        else HuggingFaceFolder.Save(model, outDir);
        WriteLossCurve(outDir, title, metrics);
        return metrics;
    }

    /// <summary>The loss curve file a run writes in its output folder.</summary>
    public const string LossCurveFile = "loss.svg";

    /// <summary>
    /// (Re)writes OUT/loss.svg from every step metrics.jsonl holds (else <paramref name="fallback"/>), with held-out
    /// evaluations as points (a trainer that scores after training adds its result this way).
    /// </summary>
    public static void WriteLossCurve(string outDir, string title, IReadOnlyList<StepMetrics>? fallback = null, IReadOnlyList<(int Step, double Loss)>? evals = null) =>
        AtomicFile.WriteText(Path.Combine(outDir, LossCurveFile), LossCurve.Svg(ReadAllMetrics(outDir, fallback ?? Array.Empty<StepMetrics>()), title, evals));

    /// <summary>Every trained step metrics.jsonl holds (a resumed run's earlier steps too; skipped steps left out), else <paramref name="fallback"/>.</summary>
    private static IReadOnlyList<StepMetrics> ReadAllMetrics(string outDir, IReadOnlyList<StepMetrics> fallback)
    {
        string path = Path.Combine(outDir, TrainingRun.MetricsFile);
        if (!File.Exists(path)) return fallback;
        return InputGuard.Parse(path, () =>
        {
            var list = new List<StepMetrics>();
            foreach (var line in File.ReadLines(path))
            {
                using var d = System.Text.Json.JsonDocument.Parse(line);
                var r = d.RootElement;
                if (!r.TryGetProperty("loss", out var loss)) continue; // a skipped (non-finite) step
                list.Add(new StepMetrics(r.GetProperty("step").GetInt32(), loss.GetDouble(), r.GetProperty("grad_norm").GetDouble(), r.GetProperty("lr").GetSingle(),
                    r.GetProperty("tokens_per_second").GetDouble(), 0));
            }

            return list;
        });
    }
}
