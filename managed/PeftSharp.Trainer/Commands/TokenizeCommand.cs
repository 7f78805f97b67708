using System.CommandLine;
using PeftSharp.Data;
using PeftSharp.Formats;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft tokenize`: a folder's tokenizer on text or ids, as JSON.</summary>
internal static class TokenizeCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var text = new Option<string?>("--text") { Description = "Text to encode" };
        var decodeIds = new Option<string?>("--decode") { Description = "Comma-separated token ids to decode" };
        var tokenize = new Command("tokenize", "Encode text (or decode ids) with a model folder's tokenizer and print JSON (for checks against other implementations).");
        foreach (var opt in new Option[] { o.Model, text, decodeIds }) tokenize.Options.Add(opt);
        tokenize.SetAction(r => Run(r.GetValue(o.Model)!, r.GetValue(text), r.GetValue(decodeIds), stdout));
        return tokenize;
    }

    private static int Run(string modelDir, string? text, string? decode, TextWriter stdout)
    {
        if ((text == null) == (decode == null)) throw new ArgumentException("tokenize: give exactly one of --text and --decode");
        var tok = HfTokenizer.ForFolder(modelDir, HuggingFaceFolder.ReadConfig(modelDir).VocabSize);
        if (text != null)
        {
            stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(new { tokenizer = tok.Name, ids = tok.Encode(text), bos = tok.Bos, eos = tok.Eos, pad = tok.Pad }));
            return 0;
        }

        var ids = decode!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(t => int.TryParse(t, out int v) && v >= 0 && v < tok.VocabSize ? v
                : throw new ArgumentException($"--decode: '{t}' is not a token id of {tok.Name} (0 .. {tok.VocabSize - 1})")).ToArray();
        stdout.WriteLine(System.Text.Json.JsonSerializer.Serialize(new { tokenizer = tok.Name, text = tok.Decode(ids) }));
        return 0;
    }
}
