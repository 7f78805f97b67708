using System.CommandLine;
using PeftSharp.Formats;
using PeftSharp.Serving;
using PeftSharp.Variants;
using Spectre.Console;

namespace PeftSharp.Trainer.Commands;

/// <summary>`peft generate`: one prompt, or every request of a file in one mixed-variant batch.</summary>
internal static class GenerateCommand
{
    public static Command Create(SharedOptions o, TextWriter stdout, TextWriter stderr)
    {
        var prompt = new Option<string?>("--prompt") { Description = "One prompt (or give --requests)" };
        var requestsOpt = new Option<string?>("--requests") { Description = "JSONL of requests {\"prompt\", \"variant\"|\"adapter\", \"max_tokens\", ...}, all served in one batch" };
        var adaptersOpt = new Option<string[]>("--adapters") { Description = "Named PEFT adapters (LoRA, DoRA, IA3 or prefix tuning): name=DIR,name=DIR (requests pick one by name)",
            AllowMultipleArgumentsPerToken = true };
        var prefixAdapter = new Option<string?>("--prefix") { Description = "A PEFT prefix-tuning folder whose virtual tokens every request reads" };
        var noSharing = new Option<bool>("--no-prefix-sharing") { Description = "Run every request over its own copy of common prompt prefixes (for comparison)" };
        var deltasOpt = new Option<string[]>("--deltas") { Description = "Named 1-bit (peft compress) or sparse delta folders: name=DIR,name=DIR", AllowMultipleArgumentsPerToken = true };
        var maxTokens = new Option<int?>("--max-tokens") { Description = "default: generation_config.json's max_new_tokens, else 32" };
        var temperature = new Option<float?>("--temperature") { Description = "0 is greedy (default: generation_config.json, else greedy)" };
        var topK = new Option<int?>("--top-k") { Description = "0 keeps all" };
        var topP = new Option<float?>("--top-p") { Description = "nucleus mass in (0, 1]" };
        var variant = new Option<string?>("--variant") { Description = "With --prompt: the variant of --adapters / --deltas that serves it (base: the base model)" };
        var arithmeticOptions = new LogitArithmeticOptions();
        var generate = new Command("generate", "Generate a completion of --prompt, or of every request in --requests in one mixed-variant batch.");
        foreach (var opt in new Option[] { o.Device, o.Model, prompt, requestsOpt, adaptersOpt, deltasOpt, prefixAdapter, noSharing, maxTokens, temperature, topK, topP,
            o.Seed, variant }.Concat(arithmeticOptions.All)) generate.Options.Add(opt);
        generate.SetAction(r =>
        {
            var arithmetic = arithmeticOptions.Read(r);
            return Run(r.GetValue(o.Device), r.GetValue(o.Model)!, r.GetValue(prompt), r.GetValue(requestsOpt),
                r.GetValue(adaptersOpt) ?? Array.Empty<string>(), r.GetValue(deltasOpt) ?? Array.Empty<string>(), r.GetValue(prefixAdapter), r.GetValue(noSharing), r.GetValue(maxTokens),
                r.GetValue(temperature), r.GetValue(topK), r.GetValue(topP), r.GetValue(o.Seed), r.GetValue(variant), arithmetic, stdout, stderr);
        });
        return generate;
    }

    private static int Run(string? deviceSpec, string modelDir, string? prompt, string? requestsPath, string[] adapters, string[] deltas, string? prefixDir, bool noSharing, int? maxTokens,
        float? temperature, int? topK, float? topP, int seed, string? variant, LogitArithmeticOptions.Request arithmetic, TextWriter stdout, TextWriter stderr)
    {
        if ((prompt == null) == (requestsPath == null)) throw new ArgumentException("generate: give either --prompt or --requests");
        if (arithmetic.Any && variant != null) throw new ArgumentException("--variant does not apply with --contrast or --proxy-base: they choose the variants every request runs on");
        if (arithmetic.Any && noSharing) throw new ArgumentException("--no-prefix-sharing does not apply with --contrast or --proxy-base (no prefixes are shared there)");
        if (arithmetic.ProxyBase != null && adapters.Length + deltas.Length > 0)
        {
            throw new ArgumentException("--adapters / --deltas do not apply with --proxy-base: the large --model runs as it is; give the small model's tuned form as --proxy-expert");
        }
        var named = RequestFile.ParseNamedFolders("--adapters", adapters);
        var namedDeltas = RequestFile.ParseNamedFolders("--deltas", deltas);
        if (requestsPath != null && variant != null) throw new ArgumentException("--variant applies to --prompt; each request of --requests names its own variant");
        if (prompt != null && named.Count + namedDeltas.Count > 0 && variant == null && !arithmetic.Any)
        {
            throw new ArgumentException($"--prompt with --adapters / --deltas: choose the variant that serves it with --variant NAME " +
                $"({string.Join(", ", named.Concat(namedDeltas).Select(v => v.Name).Append("base"))})");
        }
        using var device = Host.OpenDevice(deviceSpec);
        using var model = Host.LoadTextModel(modelDir, device);
        if (prefixDir != null)
        {
            var pa = PeftPrefixAdapter.Load(prefixDir, model.Config);
            model.AddPrefixTuning(pa.VirtualTokens, seed, pa.Keys, pa.Values);
        }

        // Flags win; then the folder's generation_config.json; then greedy, 32 tokens.
        var g = GenerationConfig.Read(modelDir);
        int max = maxTokens ?? g.MaxNewTokens ?? 32;
        float temp = temperature ?? (g.DoSample == false ? 0f : g.Temperature ?? 0f);
        int k = topK ?? g.TopK ?? 0;
        float p = topP ?? g.TopP ?? 1f;
        if (max <= 0) throw new ArgumentException($"--max-tokens {max}: must be positive");
        if (k < 0) throw new ArgumentException($"--top-k {k}: must be >= 0 (0 keeps all)");
        if (temp < 0) throw new ArgumentException($"--temperature {temp}: must be >= 0");
        if (p is <= 0 or > 1) throw new ArgumentException($"--top-p {p}: must be in (0, 1]");
        var defaults = new GenerationRequest("", null, max, temp, k, p, seed);
        using var set = new VariantSet(model);
        foreach (var (name, folder) in named.Concat(namedDeltas)) set.Add(name, VariantFolder.Load(folder, model)); // each folder says its kind
        var requests = requestsPath != null ? RequestFile.Read(requestsPath, defaults) : new[] { defaults with { Prompt = prompt!, Variant = variant } };
        foreach (var r in requests) set.IndexOf(r.Variant); // every name resolves before any work
        if (arithmetic.Any)
        {
            return RunArithmetic(device, model, set, requests, arithmetic, requestsPath == null, stdout, stderr);
        }

        var watch = System.Diagnostics.Stopwatch.StartNew();
        var (results, sharing) = BatchGenerator.GenerateWithReport(model, requests, set, noSharing ? PrefixSharing.Off : PrefixSharing.Auto);
        watch.Stop();
        if (requestsPath == null)
        {
            stdout.WriteLine(results[0].Completion);
            return 0;
        }

        WriteResults(results, stdout);
        int total = results.Sum(r => r.Tokens);
        stderr.WriteLine($"{results.Count} requests over {requests.Select(r => r.Variant ?? "base").Distinct().Count()} variants in one batch: {total} tokens in " +
            $"{watch.Elapsed.TotalSeconds:F2} s ({total / Math.Max(watch.Elapsed.TotalSeconds, 1e-9):F0} tokens/s); " +
            (sharing.Prefixes > 0 ? $"{sharing.Prefixes} shared prefixes read by {sharing.SharingSequences} requests, {sharing.TokensSaved} prefix tokens not recomputed" : "no shared prefixes"));
        return 0;
    }

    /// <summary>--contrast or --proxy-base: every request decoded from the weighted sum of several rows' logits.</summary>
    private static int RunArithmetic(PeftSharp.Engine.Device device, PeftSharp.Model.LlamaModel model, VariantSet set, IReadOnlyList<GenerationRequest> requests,
        LogitArithmeticOptions.Request a, bool onePrompt, TextWriter stdout, TextWriter stderr)
    {
        if (requests.FirstOrDefault(r => r.Variant != null && r.Variant != "base") is { } named)
        {
            throw new ArgumentException($"a request names variant '{named.Variant}': with --contrast or --proxy-base every request runs on the variants those flags give");
        }

        var (terms, what, owned) = a.Terms(device, model, set);
        try
        {
            var watch = System.Diagnostics.Stopwatch.StartNew();
            var results = LogitArithmetic.Generate(terms, requests);
            watch.Stop();
            if (onePrompt)
            {
                stdout.WriteLine(results[0].Completion);
                return 0;
            }

            WriteResults(results, stdout);
            stderr.WriteLine($"{results.Count} requests, {what}: {results.Sum(r => r.Tokens)} tokens in {watch.Elapsed.TotalSeconds:F2} s");
            return 0;
        }
        finally
        {
            foreach (var d in owned) d.Dispose();
        }
    }

    private static void WriteResults(IReadOnlyList<GenerationResult> results, TextWriter stdout)
    {
        for (int i = 0; i < results.Count; i++)
        {
            var line = new System.Text.Json.Nodes.JsonObject
            {
                ["index"] = i,
                ["variant"] = results[i].Request.Variant ?? "base",
                ["prompt"] = results[i].Request.Prompt,
                ["completion"] = results[i].Completion,
                ["tokens"] = results[i].Tokens,
            };
            stdout.WriteLine(line.ToJsonString());
        }
    }
}
