using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Formats;
using PeftSharp.Model;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>What the commands share: the console, the device, loading a model for text.</summary>
internal static class Host
{
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
    public static (List<int[]> Train, List<int[]> Eval) CalibrationBatches(ITokenizer tokenizer, string spec, int batchSize, int seqLen, int trainBatches, int evalBatches, int seed)
    {
        var (source, _, _) = Jobs.Data(spec, seed);
        var all = source.EncodeBatches(tokenizer, trainBatches + evalBatches, batchSize, seqLen, completionOnly: false, rewind: false).Select(b => b.Tokens).ToList();
        return (all.Skip(evalBatches).ToList(), all.Take(evalBatches).ToList());
    }

    /// <summary>Spectre's console over <paramref name="writer"/>: colours and live progress only on a real terminal.</summary>
    public static IAnsiConsole Console(TextWriter writer)
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
