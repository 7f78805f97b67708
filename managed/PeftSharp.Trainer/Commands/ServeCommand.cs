using System.CommandLine;
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
        var serve = new Command("serve", "Serve the model and its variants over HTTP: OpenAI's /v1/completions and /v1/models, vLLM's adapter loading, /metrics, /health.");
        foreach (var opt in new Option[] { o.Device, o.Model, adapters, host, port, name, maxRows, maxLoras, kvBlocks }) serve.Options.Add(opt);
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
            await using var app = OpenAiEndpoints.Build(server, served, $"http://{r.GetValue(host)}:{r.GetValue(port)}");
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
}
