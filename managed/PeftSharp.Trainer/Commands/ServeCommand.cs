using System.CommandLine;
using PeftSharp.Data;
using PeftSharp.Serving;
using PeftSharp.Variants;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft serve`: the model and its variants behind an OpenAI-compatible HTTP server (see <see cref="OpenAiEndpoints"/>).</summary>
internal static class ServeCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout)
    {
        var adapters = new Option<string[]>("--adapters")
        {
            Description = "Variants served by name (any variant folder: LoRA, DoRA, IA3, prefix, 1-bit or sparse delta): name=DIR,name=DIR",
            AllowMultipleArgumentsPerToken = true,
        };
        var host = new Option<string>("--host") { Description = "Address to listen on", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "Port to listen on (0 picks a free one)", DefaultValueFactory = _ => 8000 };
        var name = new Option<string?>("--served-model-name") { Description = "The base model's name in the API (default: the model folder's name)" };
        var maxRows = new Option<int>("--max-num-seqs") { Description = "Requests decoding at once (vLLM's name)", DefaultValueFactory = _ => 32 };
        var maxLoras = new Option<int>("--max-loras") { Description = "Variants resident in the device pools at once; the rest wait in host memory (LRU)", DefaultValueFactory = _ => 8 };
        var kvBlocks = new Option<int>("--kv-blocks") { Description = "KV blocks of 16 positions in all (0: a quarter of the device's memory)", DefaultValueFactory = _ => 0 };
        var chatTemplate = new Option<string?>("--chat-template")
        {
            Description = "A Jinja chat template file for /v1/chat/completions (default: the model folder's chat_template.jinja or tokenizer_config.json's)",
        };
        var serve = new Command("serve", "Serve the model and its variants over HTTP: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, vLLM's adapter loading, /metrics, /health.");
        foreach (var opt in new Option[] { o.Device, o.Model, adapters, host, port, name, maxRows, maxLoras, kvBlocks, chatTemplate }) serve.Options.Add(opt);
        serve.SetAction(async (r, cancel) =>
        {
            string modelDir = r.GetValue(o.Model)!;
            var named = RequestFile.ParseNamedFolders("--adapters", r.GetValue(adapters) ?? Array.Empty<string>());
            using var device = Host.OpenDevice(r.GetValue(o.Device));
            using var model = Host.LoadTextModel(modelDir, device);
            var options = new VariantServerOptions
            {
                MaxRows = SharedOptions.Positive("--max-num-seqs", r.GetValue(maxRows)),
                MaxLoras = SharedOptions.Positive("--max-loras", r.GetValue(maxLoras)),
                KvBlocks = r.GetValue(kvBlocks) >= 0 ? r.GetValue(kvBlocks) : throw new ArgumentException("--kv-blocks must be 0 or more"),
            };
            using var server = new VariantServer(model, options);
            foreach (var (variant, folder) in named) server.Load(variant, VariantFolder.Load(folder, model));
            string served = r.GetValue(name) ?? Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(modelDir)));
            var (chat, chatProblem) = ReadChatTemplate(modelDir, r.GetValue(chatTemplate));
            if (chat == null) stdout.WriteLine($"no chat template, /v1/chat/completions answers 400: {chatProblem}");
            await using var app = OpenAiEndpoints.Build(server, served, $"http://{r.GetValue(host)}:{r.GetValue(port)}", chat, chatProblem);
            await app.StartAsync(cancel);
            stdout.WriteLine($"serving '{served}' and {named.Count} variant(s) on {string.Join(", ", app.Urls)} ({server.KvBlocks} KV blocks); Ctrl-C drains and stops");
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancel, Host.Interruption);
            try
            {
                await Task.Delay(Timeout.Infinite, stop.Token);
            }
            catch (OperationCanceledException)
            {
            }

            await app.StopAsync(CancellationToken.None); // drains running requests
            return 0;
        });
        return serve;
    }

    /// <summary>
    /// The template chat completions render: <paramref name="file"/> when given (an error if it cannot be read or
    /// parsed), else the model folder's; a folder template that is absent or uses what PeftSharp's Jinja subset
    /// refuses leaves chat unserved with the reason, and completions still work.
    /// </summary>
    private static (ChatTemplate? Template, string? Problem) ReadChatTemplate(string modelDir, string? file)
    {
        if (file != null)
        {
            if (!File.Exists(file)) throw new FileNotFoundException($"--chat-template: {file} does not exist", file);
            var special = ChatTemplate.SpecialTokensOf(modelDir);
            return (ChatTemplate.Parse(File.ReadAllText(file), file, special), null);
        }

        try
        {
            var template = ChatTemplate.ForFolder(modelDir);
            return template != null ? (template, null) : (null, $"{modelDir} has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); pass --chat-template");
        }
        catch (Exception e) when (e is PeftSharpInputException or NotSupportedException)
        {
            return (null, e.Message);
        }
    }
}
