using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Tests.Managed;

public sealed class TrainingRunTests
{
    private static readonly LlamaConfig Config = LlamaConfig.Tiny with { NumHiddenLayers = 1, HiddenSize = 32, IntermediateSize = 64, NumAttentionHeads = 2, NumKeyValueHeads = 1 };
    private static readonly TrainOptions Options = new() { Steps = 8, BatchSize = 4, SeqLen = 24, WarmupSteps = 2, CheckpointEvery = 4, Seed = 5 };

    private static (LlamaModel, AdamW, TrainingRun) Setup(CpuDevice device, LlamaModel? model = null)
    {
        model ??= LlamaModel.Create(device, Config, Options.Seed);
        var opt = new AdamW(model.Parameters, weightDecay: Options.WeightDecay);
        var trainer = new TrainingRun(model, opt, new LearningRateSchedule.Warmup(Options.LearningRate, Options.WarmupSteps, Options.Steps),
            ExampleSource.Tasks(TaskSuite.Tasks, Options.Seed, Split.Train), Options);
        return (model, opt, trainer);
    }

    [Test]
    public void Resume_EndsBitIdenticalToAnUninterruptedRun()
    {
        string dir = Directory.CreateTempSubdirectory("peftsharp-resume-").FullName;
        try
        {
            using var device = new CpuDevice();
            var (full, fullOpt, fullTrainer) = Setup(device);
            using (full)
            using (fullOpt)
            {
                fullTrainer.Run(null);

                // Interrupted run: stop after the checkpoint at step 4, then start a new process's worth of objects.
                var (first, firstOpt, firstTrainer) = Setup(device);
                using (first)
                using (firstOpt)
                {
                    using var stop = new CancellationTokenSource();
                    firstTrainer.Run(dir, m =>
                    {
                        if (m.Step == 4) stop.Cancel(); // as if the process died right after the step-4 checkpoint
                    }, stop.Token);
                    Assert.That(firstTrainer.Step, Is.EqualTo(4));
                }

                string ckpt = Path.Combine(dir, "checkpoint");
                using var resumedModel = HuggingFaceFolder.Load(ckpt, device);
                var (_, resumedOpt, resumed) = Setup(device, resumedModel);
                using (resumedOpt)
                {
                    resumed.Resume(ckpt);
                    Assert.That(resumed.Step, Is.EqualTo(4));
                    resumed.Run(dir);
                }

                foreach (var p in full.Parameters)
                {
                    Assert.That(resumedModel[p.Name].Value.ToArray(), Is.EqualTo(p.Value.ToArray()), p.Name);
                }

                Assert.That(File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")), Has.Length.EqualTo(8));
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Test]
    public void Generator_Greedy_IsDeterministicAndStopsAtEos()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, Config, 1);
        string a = Generator.Greedy(model, "copy abc=", 5);
        Assert.That(Generator.Greedy(model, "copy abc=", 5), Is.EqualTo(a));
        Assert.That(new ByteTokenizer().Encode(a).Length, Is.LessThanOrEqualTo(5));
        string s1 = Generator.Sample(model, "add 1+2=", 6, 1.0f, 20, 0.9f, seed: 3);
        Assert.That(Generator.Sample(model, "add 1+2=", 6, 1.0f, 20, 0.9f, seed: 3), Is.EqualTo(s1));
    }
}
