using System.Diagnostics;
using PeftSharp.Engine;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Training;

namespace PeftSharp.Bench;

/// <summary>
/// dotnet run --project bench/PeftSharp.Bench -c Release -- scale [180M|1.1B] [--keep DIR]: the model at a real size,
/// random weights written by the bench as a BF16 Hugging Face folder and loaded back through the ordinary loader. Then,
/// each phase in a child process of its own so its peak RSS is its own: prefill (T = 128, one sequence), decode at
/// batch 1 / 8 / 32 (16 steps after a 128-token prompt each; batch 1 against the weight-bytes bound: fp32 weights
/// read once a step at the measured bandwidth), and LoRA r = 8 on every linear layer, batch 4 x 160 for 180M and
/// 1 x 160 for 1.1B (forward, backward, AdamW; GFLOP/s counted as 4 x parameters x positions, the frozen weights
/// taking no weight gradient), and the forward with every position's logits against ONNX Runtime on an exported graph
/// (180M only: 1.1B's fp32 weights do not fit one ONNX protobuf). Stopwatch medians; the ISA that ran. The PyTorch peer
/// is bench/torch_peer.py.
/// Shapes: 180M is SmolLM2-135M's body with Llama 3's 128,256-token vocabulary (30 layers, hidden 576, 9/3 heads,
/// intermediate 1536, tied); 1.1B is TinyLlama-1.1B (22 layers, hidden 2048, 32/4 heads, intermediate 5632, 32000
/// tokens, untied).
/// </summary>
internal static class ScaleBench
{
    public static LlamaConfig ConfigFor(string size) => size switch
    {
        "180M" => new LlamaConfig
        {
            HiddenSize = 576, IntermediateSize = 1536, NumAttentionHeads = 9, NumKeyValueHeads = 3, NumHiddenLayers = 30, VocabSize = 128256,
            RmsNormEps = 1e-5f, RopeTheta = 100000f, MaxPositionEmbeddings = 2048, TieWordEmbeddings = true,
        },
        "1.1B" => new LlamaConfig
        {
            HiddenSize = 2048, IntermediateSize = 5632, NumAttentionHeads = 32, NumKeyValueHeads = 4, NumHiddenLayers = 22, VocabSize = 32000,
            RmsNormEps = 1e-5f, RopeTheta = 10000f, MaxPositionEmbeddings = 2048, TieWordEmbeddings = false,
        },
        _ => throw new ArgumentException($"scale: size {size}: use 180M or 1.1B"),
    };

    public static void Run(string[] args)
    {
        if (args.Length > 0 && args[0] == "phase")
        {
            var inv = System.Globalization.CultureInfo.InvariantCulture;
            Phase(args[1], args[2], args[3], double.Parse(args[4], inv), double.Parse(args[5], inv));
            return;
        }

        string size = args.Length > 0 ? args[0] : "180M";
        int keep = Array.IndexOf(args, "--keep");
        string dir = keep >= 0 ? args[keep + 1] : Path.Combine(Path.GetTempPath(), $"peftsharp-scale-{size}");
        var config = ConfigFor(size);
        Console.WriteLine($"// scale {size}: ISA {(System.Runtime.Intrinsics.X86.Avx512F.IsSupported ? "AVX-512" : "AVX2")}, {Environment.ProcessorCount} threads, " +
            $"peak {PeakProbe.GFlops:F1} GFLOP/s, read bandwidth {BandwidthProbe.GBps:F1} GB/s");
        if (!File.Exists(Path.Combine(dir, HuggingFaceFolder.SingleFile)))
        {
            var clock = Stopwatch.StartNew();
            using var device = new CpuDevice();
            using var model = LlamaModel.Create(device, config, seed: 1);
            HuggingFaceFolder.Save(model, dir, StorageType.BF16);
            Console.WriteLine($"// wrote {model.ParameterCount:N0} parameters as BF16 to {dir} in {clock.Elapsed.TotalSeconds:F0} s");
        }

        string exe = Environment.ProcessPath!;
        string self = typeof(ScaleBench).Assembly.Location;
        foreach (var phase in new[] { "prefill", "decode", "lora", "ort" })
        {
            var start = new ProcessStartInfo(exe) { RedirectStandardOutput = true, UseShellExecute = false };
            if (!exe.EndsWith(Path.GetFileNameWithoutExtension(self), StringComparison.Ordinal)) start.ArgumentList.Add(self); // dotnet PeftSharp.Bench.dll
            // The parent's probes: the bandwidth probe's 512 MiB array would count in a child's peak RSS.
            var inv = System.Globalization.CultureInfo.InvariantCulture;
            foreach (var a in new[] { "scale", "phase", phase, size, dir, PeakProbe.GFlops.ToString(inv), BandwidthProbe.GBps.ToString(inv) }) start.ArgumentList.Add(a);
            using var child = Process.Start(start)!;
            Console.Write(child.StandardOutput.ReadToEnd());
            child.WaitForExit();
            if (child.ExitCode != 0) throw new InvalidOperationException($"scale phase {phase} exited with {child.ExitCode}");
        }
    }

    private static void Phase(string phase, string size, string dir, double peak, double bandwidth)
    {
        using var device = new CpuDevice();
        var clock = Stopwatch.StartNew();
        using var model = HuggingFaceFolder.Load(dir, device);
        double loadSeconds = clock.Elapsed.TotalSeconds;
        var c = model.Config;
        long parameters = model.ParameterCount;
        var rng = new Random(3);
        int[] Tokens(int n) => Enumerable.Range(0, n).Select(_ => rng.Next(c.VocabSize)).ToArray();
        const int prompt = 128;
        switch (phase)
        {
            case "prefill":
            {
                var tokens = Tokens(prompt);
                var times = Repeat(5, () =>
                {
                    using var cache = new KvCache(model, prompt);
                    model.DecodeStep(cache, tokens);
                });
                double t = Median(times);
                Console.WriteLine($"{size} prefill T={prompt}: {prompt / t:F1} tokens/s ({2.0 * parameters * prompt / t / 1e9:F1} GFLOP/s at 2 x parameters per token; " +
                    $"{2.0 * parameters * prompt / t / 1e9 / peak:P0} of peak); loaded in {loadSeconds:F1} s; {Rss()}");
                break;
            }

            case "decode":
            {
                double bound = bandwidth * 1e9 / (parameters * 4.0); // steps/s if every fp32 weight is read once a step
                // PEFTSHARP_SCALE_BATCH=8 PEFTSHARP_SCALE_STEPS=200: one batch size for longer (to profile a step).
                var only = Environment.GetEnvironmentVariable("PEFTSHARP_SCALE_BATCH");
                int steps = int.TryParse(Environment.GetEnvironmentVariable("PEFTSHARP_SCALE_STEPS"), out int told) ? told : 16;
                foreach (int batch in only != null ? new[] { int.Parse(only) } : new[] { 1, 8, 32 })
                {
                    var caches = Enumerable.Range(0, batch).Select(_ => new KvCache(model, prompt + steps + 1)).ToArray();
                    try
                    {
                        model.DecodeBatch(caches, caches.Select(_ => Tokens(prompt)).ToArray());
                        var next = caches.Select(_ => Tokens(1)).ToArray();
                        model.DecodeBatch(caches, next); // warm
                        var times = new List<double>();
                        for (int s = 0; s < steps - 1; s++)
                        {
                            var sw = Stopwatch.StartNew();
                            model.DecodeBatch(caches, next);
                            times.Add(sw.Elapsed.TotalSeconds);
                        }

                        double t = Median(times);
                        string vsBound = batch == 1 ? $"; the fp32 weight-bytes bound is {bound:F1} steps/s: {1 / t / bound:P0} of it" : "";
                        Console.WriteLine($"{size} decode batch {batch}: {batch / t:F1} tokens/s ({t * 1000:F1} ms a step){vsBound}");
                    }
                    finally
                    {
                        foreach (var cache in caches) cache.Dispose();
                    }
                }

                Console.WriteLine($"{size} decode: {Rss()}");
                break;
            }

            case "lora":
            {
                int batch = size == "180M" ? 4 : 1, seqLen = 160;
                model.AddLora(new LoraAdapterConfig { R = 8, LoraAlpha = 16, TargetModules = LoraAdapterConfig.LlamaLinear }, seed: 1);
                using var opt = new AdamW(model.AllParameters.Where(p => p.Trainable));
                var tokens = Tokens(batch * seqLen);
                var targets = tokens.Skip(1).Append(-100).ToArray();
                void Step()
                {
                    model.ZeroGrad();
                    model.Loss(tokens, targets, batch, backward: true);
                    opt.Step(1e-4f);
                }

                Step();
                var times = Repeat(3, Step);
                double t = Median(times);
                double gflops = 4.0 * parameters * batch * seqLen / t / 1e9;
                Console.WriteLine($"{size} LoRA r=8 all-linear, batch {batch} x {seqLen}: {batch * seqLen / t:F1} positions/s, {t:F2} s a step ({gflops:F1} GFLOP/s at " +
                    $"4 x parameters per position, {gflops / peak:P0} of peak); {Rss()}");
                break;
            }

            case "ort":
            {
                // The forward with every position's logits (B = 1, T = 128), ours and ONNX Runtime's on one exported
                // graph of the same weights, checked against each other first; ours first, then theirs (its pool threads
                // spin after each run).
                if (parameters * 4L > 1_800_000_000)
                {
                    Console.WriteLine($"{size} ONNX Runtime forward: skipped, {parameters * 4L / 1e9:F1} GB of fp32 weights do not fit one ONNX protobuf (2 GB)");
                    break;
                }

                var tokens = Tokens(prompt);
                var ours = model.Logits(tokens, 1);
                using var ort = new Microsoft.ML.OnnxRuntime.InferenceSession(LlamaOnnx.Export(model, 1, prompt), MatMulBench.OrtThreads());
                using var ortIn = Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(tokens.Select(t => (long)t).ToArray(), new long[] { 1, prompt });
                using var ortOut = Microsoft.ML.OnnxRuntime.OrtValue.CreateTensorValueFromMemory(new float[ours.Length], new long[] { 1, prompt, c.VocabSize });
                using var ro = new Microsoft.ML.OnnxRuntime.RunOptions();
                void Theirs() => ort.Run(ro, new[] { "input_ids" }, new[] { ortIn }, new[] { "logits" }, new[] { ortOut });
                Theirs();
                var theirs = ortOut.GetTensorDataAsSpan<float>().ToArray();
                Validate.Sampled($"{size} onnxruntime forward vs PeftSharp", theirs, i => ours[i], 1e-3, samples: 256);
                double t = Median(Repeat(5, () => model.Logits(tokens, 1)));
                Thread.Sleep(200);
                double tOrt = Median(Repeat(5, Theirs));
                Console.WriteLine($"{size} forward with all logits, T={prompt}: PeftSharp {prompt / t:F1} tokens/s, ONNX Runtime {prompt / tOrt:F1} tokens/s ({tOrt / t:F2}x); {Rss()}");
                break;
            }

            default:
                throw new ArgumentException($"scale phase {phase}: prefill, decode, lora or ort");
        }
    }

    private static List<double> Repeat(int n, Action a)
    {
        var times = new List<double>();
        for (int i = 0; i < n; i++)
        {
            var sw = Stopwatch.StartNew();
            a();
            times.Add(sw.Elapsed.TotalSeconds);
        }

        return times;
    }

    private static double Median(List<double> v)
    {
        var s = v.OrderBy(x => x).ToList();
        return s[s.Count / 2];
    }

    /// <summary>This process's peak resident memory (VmHWM), from /proc.</summary>
    private static string Rss()
    {
        var line = File.Exists("/proc/self/status") ? File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith("VmHWM:", StringComparison.Ordinal)) : null;
        return line == null ? "peak RSS unknown" : $"peak RSS {long.Parse(line.Split(new[] { ' ', '\t' }, StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0 / 1024:F2} GB";
    }
}
