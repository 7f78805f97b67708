using System.Diagnostics;
using System.Text;
using System.Text.Json;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Model;

namespace PeftSharp.Training;

/// <summary>
/// The training loop: batches from an <see cref="ExampleSource"/>, gradient accumulation, global-norm clipping,
/// a learning-rate schedule, metrics.jsonl, and checkpoints (model, optimizer state, step, data position) written
/// atomically so that a resumed run ends bit-identical to an uninterrupted one.
/// </summary>
public sealed class TrainingRun
{
    private readonly LlamaModel model;
    private readonly Optimizer optimizer;
    private readonly LearningRateSchedule schedule;
    private readonly ExampleSource data;
    private ITokenizer Tokenizer => model.Tokenizer; // read when text is first encoded

    public TrainingRun(LlamaModel model, Optimizer optimizer, LearningRateSchedule schedule, ExampleSource data, TrainOptions options)
    {
        this.model = model;
        this.optimizer = optimizer;
        this.schedule = schedule;
        this.data = data;
        Options = options;
        if (model.LoraSets.Count > 0 && (options.GroupCompletions || options.ChainEvery > 0))
        {
            throw new NotSupportedException("adapter sets train with plain batches: not with grouped completions or chain of LoRA");
        }

        if (options.BatchSize <= 0 || options.GradAccumulation <= 0 || options.SeqLen <= 0)
        {
            throw new ArgumentException($"batch size ({options.BatchSize}), gradient accumulation ({options.GradAccumulation}) and sequence length ({options.SeqLen}) must be positive");
        }
    }

    public TrainOptions Options { get; }

    /// <summary>State saved in every checkpoint and restored by <see cref="Resume"/> (add before resuming).</summary>
    public List<ICheckpointState> ExtraStates { get; } = new();

    /// <summary>The checkpoint file holding adapter parameters beside the base model's HF folder.</summary>
    public const string AdapterStateFile = "adapter_state.safetensors";

    /// <summary>Initial LoRA factors absorbed into the base (LoRA-GA), in a checkpoint.</summary>
    public const string LoraInitFile = "lora_init.safetensors";

    /// <summary>The most examples a run may read before its first step (calibration batches, LoRA-GA's gradient batches): bounds a checkpoint's data_position.</summary>
    public const long MaxExamplesBeforeTraining = 1_000_000;

    /// <summary>Steps completed (restored by <see cref="Resume"/>).</summary>
    public int Step { get; private set; }

    /// <summary>
    /// Runs until <see cref="TrainOptions.Steps"/>; <paramref name="outDir"/> receives metrics.jsonl and checkpoints.
    /// A cancelled <paramref name="cancel"/> stops the run after the step in flight, writes a checkpoint of it and
    /// throws <see cref="TrainingInterruptedException"/>.
    /// </summary>
    public IReadOnlyList<StepMetrics> Run(string? outDir, Action<StepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        var all = new List<StepMetrics>();
        var clock = Stopwatch.StartNew();
        StreamWriter? metrics = null;
        if (outDir != null)
        {
            Directory.CreateDirectory(outDir);
            RemoveLeftoverCheckpoints(outDir);
            CheckFreeSpace(outDir);
            string metricsPath = Path.Combine(outDir, MetricsFile);
            if (Step > 0) TruncateMetrics(metricsPath, Step);
            metrics = new StreamWriter(metricsPath, append: Step > 0) { AutoFlush = true }; // each step's line is on disk for whoever follows the run
        }

        try
        {
            while (Step < Options.Steps && !cancel.IsCancellationRequested)
            {
                var stepClock = Stopwatch.StartNew();
                double loss = 0, norm;
                int tokens = 0;
                float lr = schedule.At(Step);
                if (optimizer is Mezo mezo)
                {
                    // Zeroth order: two forward passes at theta +- eps z, the step taken (or skipped, g not finite) inside; no gradient.
                    var (ids, targets) = Batcher.Encode(data.Next(Options.BatchSize), Tokenizer, Options.SeqLen, Options.CompletionOnly);
                    var (plus, minus) = mezo.Step(lr, () => model.Loss(ids, targets, Options.BatchSize, backward: false).Loss);
                    loss = (plus + minus) / 2;
                    tokens = 2 * ids.Length;
                    norm = Math.Abs(mezo.LastProjectedGradient);
                }
                else
                {
                    model.ZeroGrad();
                    for (int micro = 0; micro < Options.GradAccumulation; micro++)
                    {
                        var batch = data.Next(Options.BatchSize);
                        model.DropoutSeed = unchecked(Options.Seed * 1_000_003 + Step * 131 + micro);
                        if (Options.GroupCompletions)
                        {
                            var (l, rows) = GroupedStep(batch);
                            loss += l / Options.GradAccumulation;
                            tokens += rows;
                            continue;
                        }

                        double bl;
                        int[] ids;
                        if (model.LoraSets.Count > 0)
                        {
                            // Several adapters in one batch: each example's task names its adapter; rows grouped by adapter.
                            var (ordered, counts) = BySet(batch);
                            (ids, var targets) = Batcher.Encode(ordered, Tokenizer, Options.SeqLen, Options.CompletionOnly);
                            (bl, _) = model.Loss(ids, targets, Options.BatchSize, backward: true, counts);
                        }
                        else
                        {
                            (ids, var targets) = Batcher.Encode(batch, Tokenizer, Options.SeqLen, Options.CompletionOnly);
                            (bl, _) = model.Loss(ids, targets, Options.BatchSize, backward: true);
                        }

                        loss += bl / Options.GradAccumulation;
                        tokens += ids.Length;
                    }

                    var grads = model.AllParameters.Where(p => p.Trainable).Select(p => p.Grad).ToList();
                    if (Options.GradAccumulation > 1)
                    {
                        foreach (var g in grads) model.Device.Ops.Scale(g, 1f / Options.GradAccumulation, g);
                    }

                    norm = Options.ClipNorm <= 0 ? model.Device.Ops.GlobalNorm(grads)
                        : Options.ClipPerParameter ? ParameterTools.ClipPerParameter(model.Device.Ops, model.AllParameters, Options.ClipNorm)
                        : model.Device.Ops.ClipGlobalNorm(grads, Options.ClipNorm);
                }

                bool finite = double.IsFinite(loss) && double.IsFinite(norm);
                if (!finite && !Options.SkipNonFinite) throw new TrainingDivergedException(Step + 1, loss, norm);
                if (finite && optimizer is not Mezo) optimizer.Step(lr); // a skipped step leaves weights and optimizer state as they were
                Step++;
                if (Options.ChainEvery > 0 && Step % Options.ChainEvery == 0 && Step < Options.Steps && model.Lora.Count > 0)
                {
                    model.MergeLoraAndRestart(unchecked(Options.Seed + Step));
                    optimizer.ResetState(model.Lora.Values.SelectMany(l => l.Parameters));
                }

                var m = new StepMetrics(Step, loss, norm, lr, tokens / stepClock.Elapsed.TotalSeconds, clock.Elapsed.TotalSeconds);
                all.Add(m);
                metrics?.WriteLine(finite
                    ? JsonSerializer.Serialize(new { step = m.Step, loss = m.Loss, grad_norm = m.GradNorm, lr = m.LearningRate, tokens_per_second = m.TokensPerSecond })
                    : JsonSerializer.Serialize(new { step = m.Step, skipped = $"loss {m.Loss}, gradient norm {m.GradNorm}", lr = m.LearningRate }));
                onStep?.Invoke(m);
                if (outDir != null && Options.CheckpointEvery > 0 && Step % Options.CheckpointEvery == 0)
                {
                    metrics?.Flush();
                    SaveCheckpoint(Path.Combine(outDir, CheckpointFolder));
                }
            }

            if (Step < Options.Steps && cancel.IsCancellationRequested)
            {
                // Stopped at a step boundary: the finished steps are kept in a checkpoint, and no final output is written.
                string? checkpoint = null;
                if (outDir != null)
                {
                    metrics?.Flush();
                    checkpoint = Path.Combine(outDir, CheckpointFolder);
                    SaveCheckpoint(checkpoint);
                }

                throw new TrainingInterruptedException(Step, Options.Steps, checkpoint);
            }
        }
        finally
        {
            metrics?.Dispose();
        }

        return all;
    }

    /// <summary>The per-step log in the output folder: one JSON object per line.</summary>
    public const string MetricsFile = "metrics.jsonl";

    /// <summary>The checkpoint folder a run writes in its output folder.</summary>
    public const string CheckpointFolder = "checkpoint";

    /// <summary>A checkpoint's step, optimizer steps, data position, seed and optimizer kind; its presence marks a whole checkpoint.</summary>
    public const string StateFile = "trainer_state.json";

    /// <summary>
    /// The checkpoint to resume from when given <paramref name="folder"/> (OUT/checkpoint): that folder, or, when a
    /// crash came in the instant of the swap after the old checkpoint was moved aside and before the new one was moved
    /// in, the old one (folder.old). Null when neither holds a checkpoint.
    /// </summary>
    public static string? LocateCheckpoint(string folder)
    {
        string full = Path.GetFullPath(folder);
        foreach (var candidate in new[] { full, full + ".old" })
        {
            if (File.Exists(Path.Combine(candidate, StateFile))) return candidate;
        }

        return null;
    }

    /// <summary>Folders a killed run left half-written (checkpoint.tmp-PID); the last complete checkpoint is never among them.</summary>
    private static void RemoveLeftoverCheckpoints(string outDir)
    {
        foreach (var dir in Directory.GetDirectories(outDir, CheckpointFolder + ".tmp-*")) Directory.Delete(dir, recursive: true);
        // A crash after the new checkpoint moved in but before the old one was removed leaves both; the new one is whole.
        string old = Path.Combine(outDir, CheckpointFolder + ".old");
        if (Directory.Exists(old) && File.Exists(Path.Combine(outDir, CheckpointFolder, StateFile))) Directory.Delete(old, recursive: true);
    }

    /// <summary>
    /// A resumed run keeps metrics.jsonl's complete lines up to its checkpoint's step: a line a kill tore, and the
    /// steps run after the checkpoint (which the resumed run repeats), are dropped, so no step appears twice.
    /// </summary>
    private static void TruncateMetrics(string path, int step)
    {
        if (!File.Exists(path)) return;
        var kept = new StringBuilder();
        foreach (var line in File.ReadLines(path))
        {
            if (StepOf(line) is int n && n <= step) kept.Append(line).Append('\n');
        }

        AtomicFile.WriteText(path, kept.ToString());

        static int? StepOf(string line)
        {
            try
            {
                using var doc = JsonDocument.Parse(line);
                return doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("step", out var v) && v.TryGetInt32(out int n) ? n : null;
            }
            catch (JsonException)
            {
                return null; // a line a kill tore
            }
        }
    }

    /// <summary>
    /// Bytes a run's output needs at its peak: while a checkpoint swaps, the new one and the previous one (each counted
    /// as four copies of the values at 4 bytes: weights, two optimizer moments, adapter and extra state), the final
    /// model, and a quarter of the model's size to spare.
    /// </summary>
    public long EstimateOutputBytes()
    {
        long values = model.AllParameters.Sum(p => (long)p.Value.Length);
        long checkpoint = values * 4 * 4; // weights, two moments, adapters and extras at most as large again
        return (Options.CheckpointEvery > 0 ? 2 * checkpoint : 0) + values * 4 + values * 4 / 4;
    }

    /// <summary>Refuses to start a run whose output cannot fit the disk, before the first step rather than at a failed checkpoint.</summary>
    private void CheckFreeSpace(string outDir)
    {
        long available;
        try
        {
            available = new DriveInfo(Path.GetFullPath(outDir)).AvailableFreeSpace;
        }
        catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException)
        {
            return; // a file system that does not report its free space: write and see
        }

        long need = EstimateOutputBytes();
        if (need > available)
        {
            throw new IOException($"{outDir}: the run needs about {need / 1e6:F1} MB for its checkpoints and model and the disk has {available / 1e6:F1} MB free");
        }
    }

    /// <summary>The batch ordered by adapter set (each example's task names its set), and how many examples each set has.</summary>
    private (List<Example> Ordered, int[] Counts) BySet(IReadOnlyList<Example> batch)
    {
        var index = model.LoraSets.Select((s, i) => (s.Name, i)).ToDictionary(p => p.Name, p => p.i);
        var keyed = batch.Select(e => (Example: e, Set: index.TryGetValue(e.Task, out int k)
            ? k
            : throw new PeftSharpInputException($"example of task '{e.Task}' has no adapter (adapters: {string.Join(", ", index.Keys)})"))).ToList();
        var ordered = keyed.OrderBy(p => p.Set).Select(p => p.Example).ToList(); // stable: keeps the stream's order within a set
        var counts = new int[index.Count];
        foreach (var (_, set) in keyed) counts[set]++;
        return (ordered, counts);
    }

    /// <summary>
    /// One micro-batch as prompt groups: each distinct prompt is encoded once with all its completions
    /// (<see cref="LlamaModel.GroupedLoss"/>), each group's gradient weighted by its share of the batch's completion
    /// tokens, so the step equals the plain completion-only batch. Returns the mean loss and the rows computed.
    /// </summary>
    private (double Loss, int Rows) GroupedStep(IReadOnlyList<Example> batch)
    {
        if (batch.Any(e => e.Ids != null)) throw new ArgumentException("grouped completions need prompt/completion examples; text windows have no prompt to share");
        var groups = batch.GroupBy(e => e.Prompt).Select(g => (
            Prompt: Tokenizer.EncodeStart(g.Key).ToArray(),
            Completions: g.Select(e => Tokenizer.EncodeEnd(e.Completion)).ToArray())).ToList();
        int total = groups.Sum(g => g.Completions.Sum(c => c.Length));
        double loss = 0;
        int rows = 0;
        foreach (var (prompt, completions) in groups)
        {
            int counted = completions.Sum(c => c.Length);
            if (prompt.Length + completions.Max(c => c.Length) > Options.SeqLen + 1)
            {
                throw new ArgumentException($"a prompt of {prompt.Length} tokens with completions up to {completions.Max(c => c.Length)} needs more than the sequence length {Options.SeqLen}");
            }

            float weight = (float)counted / total;
            var (l, _) = model.GroupedLoss(prompt, completions, backward: true, Tokenizer.Pad, weight);
            loss += l * weight;
            rows += prompt.Length - 1 + completions.Length * completions.Max(c => c.Length);
        }

        return (loss, rows);
    }

    /// <summary>
    /// Writes model, optimizer state and trainer state into a fresh folder, then swaps it into place, so the
    /// previous checkpoint survives a crash at any point.
    /// </summary>
    public void SaveCheckpoint(string folder)
    {
        string full = Path.GetFullPath(folder);
        string tmp = full + $".tmp-{Environment.ProcessId}";
        if (Directory.Exists(tmp)) Directory.Delete(tmp, recursive: true);
        HuggingFaceFolder.Save(model, tmp);
        var state = optimizer.ExportState().Select(s => new SafeTensorData(s.Name, s.Values, s.Shape)).ToList();
        SafeTensorsWriter.Write(Path.Combine(tmp, "optimizer.safetensors"), state);
        // Adapter parameters (LoRA A, B, DoRA magnitudes, prefix tokens) by name; the base is the HF folder above.
        var adapter = AdapterParameters().Select(p => new SafeTensorData(p.Name, p.Value.ToArray(), p.Value.Shape.ToArray())).ToList();
        if (adapter.Count > 0) SafeTensorsWriter.Write(Path.Combine(tmp, AdapterStateFile), adapter);
        // LoRA-GA: the base above holds W - s B0 A0; the export against the original W needs B0 and A0.
        var init = model.LoraInitFactors.SelectMany(kv => new[]
        {
            new SafeTensorData(kv.Key + ".lora_A0", kv.Value.A0, model.Lora[kv.Key].A.Value.Shape.ToArray()),
            new SafeTensorData(kv.Key + ".lora_B0", kv.Value.B0, model.Lora[kv.Key].B.Value.Shape.ToArray()),
        }).ToList();
        if (init.Count > 0) SafeTensorsWriter.Write(Path.Combine(tmp, LoraInitFile), init);
        foreach (var extra in ExtraStates) SafeTensorsWriter.Write(Path.Combine(tmp, extra.File), extra.Export().ToList());
        var trainerState = new Dictionary<string, object>
        {
            ["step"] = Step,
            ["optimizer_steps"] = optimizer.StepCount,
            ["data_position"] = data.Position,
            ["seed"] = Options.Seed,
            ["optimizer"] = optimizer.GetType().Name,
            ["settings"] = Options.ResumeSettings(),
        };
        AtomicFile.WriteText(Path.Combine(tmp, StateFile), JsonSerializer.Serialize(trainerState, new JsonSerializerOptions { WriteIndented = true }));
        string old = full + ".old";
        if (Directory.Exists(old)) Directory.Delete(old, recursive: true);
        if (Directory.Exists(full)) Directory.Move(full, old);
        Directory.Move(tmp, full);
        if (Directory.Exists(old)) Directory.Delete(old, recursive: true);
    }

    /// <summary>What trains beside the base model's own parameters: LoRA layers, DoRA magnitudes, virtual tokens.</summary>
    private List<Parameter> AdapterParameters() => model.AllParameters.Except(model.Parameters).ToList();

    /// <summary>The steps a checkpoint has completed (its trainer_state.json's step).</summary>
    public static int CheckpointStep(string folder) => InputGuard.Parse(folder, () =>
        checked((int)(JsonConfigFile.Read(folder, StateFile, "checkpoint")["step"]?.Value<long>() ?? throw new PeftSharpInputException($"{Path.Combine(folder, StateFile)}: no step"))));

    /// <summary>Restores optimizer state, step and data position from a checkpoint (the model is loaded by the caller).</summary>
    public void Resume(string folder) =>
        InputGuard.Parse(folder, () => ResumeCore(folder));

    private void ResumeCore(string folder)
    {
        string statePath = Path.Combine(folder, StateFile);
        if (!File.Exists(statePath)) throw new FileNotFoundException($"{folder}: not a checkpoint (no trainer_state.json)", statePath);
        var root = JsonConfigFile.Read(folder, StateFile, "checkpoint");
        long Need(string key) => root[key]?.Value<long>() ?? throw new PeftSharpInputException($"{statePath}: no {key}");
        string kind = JsonConfigFile.RequiredString(root, "optimizer", statePath);
        int step = checked((int)Need("step")), optimizerSteps = checked((int)Need("optimizer_steps"));
        long position = Need("data_position");
        long perStep = (long)Options.BatchSize * Options.GradAccumulation;
        if (step < 0 || step > Options.Steps || optimizerSteps < 0 || position < 0)
        {
            throw new PeftSharpInputException($"{statePath}: step {step}, optimizer_steps {optimizerSteps} and data_position {position} must be non-negative, " +
                $"and step at most this run's {Options.Steps}");
        }

        // Each step reads batch x accumulation examples; a look at the data before training (calibration, LoRA-GA) reads
        // a few thousand more. A position far beyond that is a corrupt file, and replaying it would take hours.
        if (position > step * perStep + MaxExamplesBeforeTraining)
        {
            throw new PeftSharpInputException($"{statePath}: data_position {position} is more than step {step} x {perStep} examples per step could have read " +
                $"(+{MaxExamplesBeforeTraining} before training)");
        }

        if (kind != optimizer.GetType().Name) throw new PeftSharpInputException($"{statePath}: checkpoint used {kind}, this run uses {optimizer.GetType().Name}");
        if (root["settings"] is System.Text.Json.Nodes.JsonObject saved) // checkpoints before settings were recorded have none
        {
            var now = Options.ResumeSettings();
            var differ = saved.Select(kv => kv.Key).Union(now.Keys).Order(StringComparer.Ordinal)
                .Select(k => (Key: k, Then: saved[k]?.Value<string>(), Now: now.GetValueOrDefault(k))).Where(d => d.Then != d.Now).ToList();
            if (differ.Count > 0)
            {
                throw new PeftSharpInputException($"{statePath}: this run differs from the one that wrote the checkpoint, so resuming would not continue it: " +
                    string.Join("; ", differ.Select(d => $"{d.Key} was {d.Then ?? "(unset)"}, now {d.Now ?? "(unset)"}")));
            }
        }

        // Extra states first: a sparse fine-tune's masks decide the layout of the optimizer's moments.
        foreach (var extra in ExtraStates)
        {
            string path = Path.Combine(folder, extra.File);
            if (!File.Exists(path)) throw new PeftSharpInputException($"{folder}: the checkpoint has no {extra.File}, which this run needs to resume");
            using var ef = SafeTensorsFile.Open(path);
            extra.Import(ef);
        }

        using var st = SafeTensorsFile.Open(Path.Combine(folder, "optimizer.safetensors"));
        optimizer.ImportState(name => st.Contains(name) ? st.ReadFloats(name) : null, optimizerSteps);
        Step = step;
        data.Seek(position);
        var adapterParams = AdapterParameters();
        string adapterPath = Path.Combine(folder, AdapterStateFile);
        if (adapterParams.Count > 0 != File.Exists(adapterPath))
        {
            throw new PeftSharpInputException($"{folder}: the checkpoint " +
                $"{(File.Exists(adapterPath) ? "holds adapter parameters but this run has no adapter" : "holds no adapter parameters but this run trains an adapter")}");
        }

        if (adapterParams.Count > 0)
        {
            using var af = SafeTensorsFile.Open(adapterPath);
            var problems = adapterParams.Where(p => !af.Contains(p.Name) || af[p.Name].Elements != p.Value.Length).Select(p => p.Name).ToList();
            if (problems.Count > 0 || af.Tensors.Count != adapterParams.Count)
            {
                throw new PeftSharpInputException($"{adapterPath}: the adapter in the checkpoint does not match this run's ({af.Tensors.Count} tensors there, {adapterParams.Count} here; " +
                    $"missing or resized: {string.Join(", ", problems)})");
            }

            foreach (var p in adapterParams) p.Value.CopyFrom(af.ReadFloats(p.Name));
        }

        string initPath = Path.Combine(folder, LoraInitFile);
        if (File.Exists(initPath))
        {
            using var inf = SafeTensorsFile.Open(initPath);
            var modules = inf.Tensors.Select(t => t.Name).Where(n => n.EndsWith(".lora_A0", StringComparison.Ordinal)).Select(n => n[..^".lora_A0".Length]).ToList();
            foreach (var module in modules)
            {
                if (!inf.Contains(module + ".lora_B0")) throw new PeftSharpInputException($"{initPath}: {module}.lora_A0 without {module}.lora_B0");
                model.RestoreLoraInit(module, inf.ReadFloats(module + ".lora_A0"), inf.ReadFloats(module + ".lora_B0"));
            }
        }
    }
}
