using System.CommandLine;
using PeftSharp.Compression;
using PeftSharp.Data;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Training;
using Spectre.Console;
using PeftSharp.Variants;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft quickstart`: the main job on built-in data, no download.</summary>
internal static class QuickstartCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout, TextWriter stderr)
    {
        var qsOut = new Option<string>("--out") { Description = "Output folder", DefaultValueFactory = _ => "peft-quickstart" };
        var qsPre = new Option<int>("--pretrain-steps") { DefaultValueFactory = _ => 3000 };
        var qsFine = new Option<int>("--finetune-steps") { DefaultValueFactory = _ => 600 };
        var quickstart = new Command("quickstart", "The main job on built-in data: pretrain a tiny model, fine-tune it on a held-out task, evaluate before and after.");
        foreach (var opt in new Option[] { o.Device, qsOut, qsPre, qsFine, o.Seed, o.Quiet, o.Json }) quickstart.Options.Add(opt);
        quickstart.SetAction(r => Run(r.GetValue(o.Device), r.GetValue(qsOut)!, SharedOptions.Positive("--pretrain-steps", r.GetValue(qsPre)),
            SharedOptions.Positive("--finetune-steps", r.GetValue(qsFine)), r.GetValue(o.Seed), r.GetValue(o.Quiet), r.GetValue(o.Json), stdout, stderr));
        return quickstart;
    }

    private static int Run(string? deviceSpec, string outDir, int pretrainSteps, int finetuneSteps, int seed, bool quiet, bool json, TextWriter stdout, TextWriter stderr)
    {
        // With --json the table is one JSON object on stdout and the running commentary goes to stderr.
        var console = Host.Console(json ? stderr : stdout);
        using var device = Host.OpenDevice(deviceSpec);
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
        var loraConfig = TrainCommand.LoraConfigFrom(8, 16f, "all-linear", false);
        loraModel.AddLora(loraConfig, seed);
        long loraTrainable = loraModel.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        jobs.Train(loraModel, ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train), fineOptions with { LearningRate = 3e-3f },
            Path.Combine(outDir, "finetuned-lora"), "lora", null, save: dir => loraModel.ExportLora(loraConfig).Save(dir, loraModel.Config));
        var loraAfter = Evaluator.Evaluate(loraModel, taskHeld, options.SeqLen);
        var loraOnPre = Evaluator.Evaluate(loraModel, preHeld, options.SeqLen);
        const int virtualTokens = 32;
        console.MarkupLine($"3b. prefix tuning of the pre-trained model on '{heldOutTask}' ({virtualTokens} virtual tokens per layer, base frozen)");
        using var prefixModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        prefixModel.AddPrefixTuning(virtualTokens, seed);
        long prefixTrainable = prefixModel.AllParameters.Where(p => p.Trainable).Sum(p => (long)p.Value.Length);
        jobs.Train(prefixModel, ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train), fineOptions with { LearningRate = 5e-2f },
            Path.Combine(outDir, "finetuned-prefix"), "prefix", null, save: dir => PeftPrefixAdapter.From(prefixModel).Save(dir, prefixModel.Config));
        var prefixAfter = Evaluator.Evaluate(prefixModel, taskHeld, options.SeqLen);
        console.MarkupLine($"3c. sparse fine-tune of the pre-trained model on '{heldOutTask}': 1% of each tensor's entries, chosen by gradient magnitude");
        using var sparseModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        var sparseData = ExampleSource.Tasks(new[] { heldOutTask }, seed + 7, Split.Train);
        var sparseOptions = fineOptions with { LearningRate = 3e-2f };
        var sparse = Finetune.Prepare(sparseModel, new FinetuneOptions { Method = FinetuneMethod.Sparse, Density = 0.01, MaskSource = MaskSource.Gradient }, sparseOptions, sparseData);
        long sparseTrainable = sparse.Masks!.Values.Sum(m => (long)m.Length);
        jobs.Train(sparseModel, sparseData, sparseOptions, Path.Combine(outDir, "finetuned-sparse"), "sparse", null, recipe: sparse);

        var sparseAfter = Evaluator.Evaluate(sparseModel, taskHeld, options.SeqLen);
        console.MarkupLine("4. compress the full fine-tune to 1-bit deltas over the pre-trained model (BitDelta), then distill the scales; and to ComPEFT's signs of its top 10%; " +
            "the LoRA fine-tune to Delta-CoMe's mixed-precision factors; the pre-trained model itself to LoRD's half-rank factors");
        using var baseModel = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device);
        var delta = BitDelta.Compress(baseModel, model);
        var (calibTrain, calibEval) = Host.CalibrationBatches(baseModel.Tokenizer, $"builtin:tasks", 8, options.SeqLen, 32, 4, seed + 11);
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
            Path.Combine(outDir, "finetuned-renamed"), "sgd fine-tune", null, new FinetuneOptions { Optimizer = OptimizerKind.Sgd });
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
        // ComPEFT beside BitDelta: the same task vector as signs of its top 10% with one magnitude per tensor.
        var compeft = ComPeft.Compress(baseModel, model, density: 0.1);
        EvalResult compeftResult;
        using (var m = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        {
            compeft.MergeInto(m);
            compeftResult = Evaluator.Evaluate(m, taskHeld, options.SeqLen);
        }

        // Delta-CoMe beside them: the LoRA fine-tune's change as rank-4 SVD factors at 8 / 4 / 2 bits (the full
        // fine-tune changed the tied embedding, which a PEFT folder cannot carry).
        EvalResult deltaComeResult;
        long deltaComeBytes;
        using (var loraMerged = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        using (var m = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained"), device))
        {
            PeftLoraAdapter.Load(Path.Combine(outDir, "finetuned-lora"), loraMerged.Config).MergeInto(loraMerged);
            var (dc, bytes) = DeltaCoMe.Compress(baseModel, loraMerged, rank: 4);
            dc.MergeInto(m);
            deltaComeResult = Evaluator.Evaluate(m, taskHeld, options.SeqLen);
            deltaComeBytes = bytes;
        }

        // LoRD compresses the pre-trained model itself: each linear weight as factors of half its rank, scored where
        // the pre-trained model was (the pre-training tasks).
        var lord = LordModel.Compress(baseModel, rankRatio: 0.5);
        lord.Save(Path.Combine(outDir, "pretrained-lord"), baseModel);
        EvalResult lordResult;
        using (var m = HuggingFaceFolder.Load(Path.Combine(outDir, "pretrained-lord"), device)) lordResult = Evaluator.Evaluate(m, preHeld, options.SeqLen);
        console.WriteLine(CompressCommand.Summary(baseModel, distilled));
        console.WriteLine(CompressCommand.LordSummary(baseModel, lord));
        var rows = new List<(string Model, string Trainable, string Data, EvalResult Result)>();
        string all = $"{model.ParameterCount:N0}";
        rows.Add(("pre-trained", "-", "pre-training tasks", preOnPre));
        rows.Add(("pre-trained", "-", $"'{heldOutTask}' (unseen task)", before));
        rows.Add(("full fine-tune", all, $"'{heldOutTask}'", after));
        rows.Add(("full fine-tune", all, "pre-training tasks", afterOnPre));
        rows.Add(("LoRA r=8", $"{loraTrainable:N0}", $"'{heldOutTask}'", loraAfter));
        rows.Add(("LoRA r=8", $"{loraTrainable:N0}", "pre-training tasks", loraOnPre));
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
        rows.Add(($"prefix tuning ({virtualTokens} tokens)", $"{prefixTrainable:N0}", $"'{heldOutTask}'", prefixAfter));
        rows.Add(("sparse fine-tune (1%)", $"{sparseTrainable:N0}", $"'{heldOutTask}'", sparseAfter));
        rows.Add(("pre-trained", "-", $"'{renamedTask}' (sort, new tag)", renamedBefore));
        rows.Add(("SGD fine-tune", all, $"'{renamedTask}'", renamedAfter));
        rows.Add(($"grafted {100 * graft.Density:F1}% of it", $"{graft.Entries:N0}", $"'{renamedTask}'", grafted));
        string bits = $"{delta.PackedBytes + delta.DenseBytes:N0} B";
        rows.Add(("1-bit delta of full FT", bits, $"'{heldOutTask}'", bitBefore));
        rows.Add(("1-bit delta, distilled", bits, $"'{heldOutTask}'", bitAfter));
        rows.Add(("ComPEFT of full FT (10%)", $"{ComPeft.TernaryBytes(compeft, 0.1):N0} B", $"'{heldOutTask}'", compeftResult));
        rows.Add(("Delta-CoMe of LoRA (r=4)", $"{deltaComeBytes:N0} B", $"'{heldOutTask}'", deltaComeResult));
        rows.Add(($"LoRD of pre-trained ({100.0 * lord.Parameters / model.ParameterCount:F0}%)", $"{lord.Parameters * 4L:N0} B", "pre-training tasks", lordResult));
        if (json)
        {
            stdout.WriteLine(new System.Text.Json.Nodes.JsonObject
            {
                ["device"] = device.Info.Spec,
                ["rows"] = new System.Text.Json.Nodes.JsonArray(rows.Select(r => (System.Text.Json.Nodes.JsonNode)new System.Text.Json.Nodes.JsonObject
                {
                    ["model"] = r.Model, ["trainable"] = r.Trainable, ["data"] = r.Data, ["loss"] = r.Result.Loss, ["exact_match"] = r.Result.ExactMatch, ["examples"] = r.Result.Examples,
                }).ToArray()),
            }.ToJsonString());
        }
        else
        {
            var table = new Table().AddColumns("model", "trainable", "data (held-out examples)", "loss", "exact match");
            foreach (var r in rows) table.AddRow(r.Model, r.Trainable, r.Data, $"{r.Result.Loss:F3}", $"{r.Result.ExactMatch:P1}");
            console.Write(table);
        }

        int shotTokens = 1 + ByteTokenizer.Instance.Encode(shots).Length;
        console.MarkupLine($"shared prompt of {shotTokens} tokens, 32 requests: {sharedSeconds * 1000:F0} ms with one shared copy of its keys and values ({sharedReport.TokensSaved:N0} " +
            $"prompt tokens not recomputed), " +
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
        console.MarkupLine($"{model.ParameterCount:N0} parameters; LoRA trains {loraTrainable:N0} ({100.0 * loraTrainable / model.ParameterCount:F1}%); pre-training ran at {tps:F0} " +
            $"tokens/s; total {clock.Elapsed.TotalSeconds:F0} s");
        console.MarkupLine($"models, metrics.jsonl and loss.svg in [bold]{Markup.Escape(Path.GetFullPath(outDir))}[/]");
        return 0;
    }
}
