using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>What the commands share: the console, the device, loading a model for text.</summary>
internal static class Host
{
    private static readonly CancellationTokenSource InterruptSource = new();

    /// <summary>Cancelled by the first Ctrl-C or SIGTERM: training stops after the step in flight and checkpoints.</summary>
    public static CancellationToken Interruption => InterruptSource.Token;

    /// <summary>
    /// Ctrl-C (SIGINT) and SIGTERM: the first asks the running command to stop at its next step boundary (training
    /// writes a checkpoint and says how to resume); the second exits at once, showing the terminal cursor again (a
    /// progress bar hides it). Dispose to stop handling them.
    /// </summary>
    public static IDisposable HandleInterrupts(TextWriter stderr)
    {
        int signals = 0;
        void Handle(System.Runtime.InteropServices.PosixSignalContext context)
        {
            if (Interlocked.Increment(ref signals) == 1)
            {
                context.Cancel = true;
                stderr.WriteLine($"{Environment.NewLine}peft: {context.Signal}: stopping (training: after this step, with a checkpoint; " +
                    $"serving: once running requests finish; {context.Signal} again to quit at once)");
                InterruptSource.Cancel();
                return;
            }

            if (!System.Console.IsOutputRedirected) System.Console.Out.Write("\u001b[?25h");
            context.Cancel = false; // the default: the process ends
        }

        var registrations = new[] { System.Runtime.InteropServices.PosixSignal.SIGINT, System.Runtime.InteropServices.PosixSignal.SIGTERM }
            .Select(s => System.Runtime.InteropServices.PosixSignalRegistration.Create(s, Handle)).ToList();
        return new Registrations(registrations);
    }

    private sealed class Registrations(List<System.Runtime.InteropServices.PosixSignalRegistration> all) : IDisposable
    {
        public void Dispose()
        {
            foreach (var r in all) r.Dispose();
        }
    }

    /// <summary>Files whose presence marks a finished output: a model, a PEFT adapter, a 1-bit or sparse delta.</summary>
    private static readonly string[] FinishedOutputs =
    {
        "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json", "bitdelta_config.json", "sparse_config.json", "lord_config.json",
    };

    /// <summary>
    /// Refuses an --out that would lose something: a file where the folder goes, one of the command's own inputs, or a
    /// folder that already holds a finished output (unless <paramref name="overwrite"/>, or the run resumes the one
    /// that wrote it). <paramref name="inputs"/> are (flag, folder) pairs.
    /// </summary>
    public static void CheckOutput(string outDir, bool overwrite, bool resuming, params (string Flag, string? Folder)[] inputs)
    {
        if (File.Exists(outDir)) throw new ArgumentException($"--out {outDir}: is a file; give a folder to write into");
        string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(outDir));
        foreach (var (flag, folder) in inputs)
        {
            if (folder != null && string.Equals(full, Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder)), StringComparison.Ordinal))
            {
                throw new ArgumentException($"--out {outDir} is also {flag}: writing there would replace the input while it is read; choose another folder");
            }
        }

        if (overwrite || resuming || !Directory.Exists(outDir)) return;
        var held = FinishedOutputs.Where(f => File.Exists(Path.Combine(outDir, f))).ToList();
        if (held.Count > 0) throw new ArgumentException($"--out {outDir} already holds {string.Join(", ", held)}; pass --overwrite to replace it, or choose another folder");
    }

    /// <summary>Copies the files of a model folder beside its weights (generation config, tokenizer files) into another.</summary>
    public static void CopyModelExtras(string from, string to)
    {
        foreach (var extra in new[] { "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json" })
        {
            string src = Path.Combine(from, extra);
            if (File.Exists(src)) File.Copy(src, Path.Combine(to, extra), overwrite: true);
        }
    }

    /// <summary>Deletes a model folder's dense weights (model.safetensors, or an index and its shards): --overwrite replacing them with another form.</summary>
    public static void RemoveDenseWeights(string folder)
    {
        if (!Directory.Exists(folder)) return;
        foreach (var f in Directory.EnumerateFiles(folder, "model*.safetensors*").Where(f => Path.GetFileName(f) is var n && (n == "model.safetensors" || n == "model.safetensors.index.json" ||
            System.Text.RegularExpressions.Regex.IsMatch(n, @"^model-\d{5}-of-\d{5}\.safetensors$"))))
        {
            File.Delete(f);
        }
    }

    /// <summary>A warning on stderr: the command goes on.</summary>
    public static void Warn(string warning) => System.Console.Error.WriteLine($"peft: warning: {warning}");

    public static Device OpenDevice(string? spec) => spec is { Length: > 0 } ? Devices.Open(spec) : Devices.OpenDefault();

    /// <summary>
    /// A model for text commands: its folder's tokenizer.json / tokenizer.model, or the built-in byte tokenizer for
    /// vocab_size 259. The tokenizer is read here, so a folder without a usable one fails before any work starts.
    /// </summary>
    public static LlamaModel LoadTextModel(string folder, Device device)
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

        var model = HuggingFaceFolder.Load(folder, device, Warn);
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

    /// <summary>Calibration batches of (batch, seqLen) tokens from a data spec: the first <paramref name="evalBatches"/> are held out.</summary>
    public static (List<int[]> Train, List<int[]> Eval) CalibrationBatches(ITokenizer tokenizer, string spec, int batchSize, int seqLen, int trainBatches, int evalBatches, int seed,
        string flag = "--calib")
    {
        var source = Jobs.Data(spec, seed, tokenizer, seqLen, flag: flag).Train;
        var all = source.EncodeBatches(tokenizer, trainBatches + evalBatches, batchSize, seqLen, completionOnly: false, rewind: false).Select(b => b.Tokens).ToList();
        return (all.Skip(evalBatches).ToList(), all.Take(evalBatches).ToList());
    }

    /// <summary>The line width of output that is not a terminal: wide enough that no message is wrapped.</summary>
    private const int RedirectedWidth = 100_000;

    /// <summary>Spectre's console over <paramref name="writer"/>: colours and live progress only on a real terminal.</summary>
    public static IAnsiConsole Console(TextWriter writer)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(writer),
            Ansi = writer == System.Console.Out ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = writer == System.Console.Out ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        // Redirected output is not wrapped at a made-up width (a log line stays one line); tables take what they need.
        if (writer != System.Console.Out || System.Console.IsOutputRedirected) console.Profile.Width = RedirectedWidth;
        return console;
    }
}
