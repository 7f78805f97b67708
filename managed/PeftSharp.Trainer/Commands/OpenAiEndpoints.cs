using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using PeftSharp.Data;
using PeftSharp.Serving;
using PeftSharp.Variants;

namespace PeftSharp.Trainer.Commands;

/// <summary>
/// The HTTP face of a <see cref="VariantServer"/> (ASP.NET Core minimal APIs on Kestrel): OpenAI's
/// <c>/v1/completions</c> (streaming by server-sent events) and <c>/v1/models</c>, vLLM's
/// <c>/v1/load_lora_adapter</c> / <c>/v1/unload_lora_adapter</c> (any variant folder), Prometheus <c>/metrics</c> with
/// vLLM's names and <c>/health</c>. <c>model</c> names the base (its served name or "base") or a loaded variant.
/// <c>/v1/chat/completions</c> renders the model's chat template (<see cref="ChatTemplate"/>) and tokenizes the text
/// without an added BOS, as vLLM does.
/// </summary>
public static class OpenAiEndpoints
{
    /// <summary>
    /// Builds the app on <paramref name="url"/> (e.g. http://127.0.0.1:8000; port 0 picks a free one); shutting it
    /// down drains running requests. A request without <c>seed</c> samples from a fresh one, as OpenAI's API does.
    /// </summary>
    /// <param name="chat">The chat template /v1/chat/completions renders; null answers it with 400 and <paramref name="chatProblem"/>.</param>
    /// <param name="chatProblem">Why there is no template (absent, or refused when parsed), for that answer.</param>
    public static WebApplication Build(VariantServer server, string modelName, string url, ChatTemplate? chat = null, string? chatProblem = null)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.UseUrls(url);
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromMinutes(5));
        var app = builder.Build();
        app.Lifetime.ApplicationStopping.Register(() => server.DrainAsync().Wait());
        var model = server.Model;
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();

        app.MapGet("/health", () => Results.Ok());
        app.MapGet("/v1/models", () => Results.Json(new JsonObject
        {
            ["object"] = "list",
            ["data"] = new JsonArray(new[] { ModelCard(modelName, null, created) }.Concat(server.Variants.Select(v => ModelCard(v, modelName, created))).ToArray()),
        }));
        app.MapGet("/metrics", () => Results.Text(Prometheus(server.Stats, modelName), "text/plain; version=0.0.4"));
        app.MapPost("/v1/load_lora_adapter", async (HttpRequest http) =>
        {
            var body = await ReadBody(http);
            string name = Text(body, "lora_name") ?? throw new BadRequest("lora_name is required");
            string path = Text(body, "lora_path") ?? throw new BadRequest("lora_path is required");
            if (server.Knows(name)) throw new BadRequest($"The lora adapter '{name}' has already been loaded.");
            server.Load(name, VariantFolder.Load(path, model));
            return Results.Text($"Success: LoRA adapter '{name}' added successfully.");
        });
        app.MapPost("/v1/unload_lora_adapter", async (HttpRequest http) =>
        {
            var body = await ReadBody(http);
            string name = Text(body, "lora_name") ?? throw new BadRequest("lora_name is required");
            return server.Unload(name)
                ? Results.Text($"Success: LoRA adapter '{name}' removed successfully.")
                : Error(404, "NotFoundError", $"The lora adapter '{name}' cannot be found.");
        });
        app.MapPost("/v1/chat/completions", async (HttpContext context) =>
        {
            var body = await ReadBody(context.Request);
            var (name, variant, known) = ModelOf(body, server, modelName);
            if (!known) return Error(404, "NotFoundError", $"The model `{name}` does not exist.");
            if (chat == null)
            {
                throw new BadRequest(chatProblem ?? "the model folder has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); "
                    + "pass one with --chat-template, or use /v1/completions");
            }

            var messages = body["messages"] as JsonArray ?? throw new BadRequest("messages must be a list of {role, content}");
            string prompt = chat.Render(ChatMessages(messages), Flag(body, "add_generation_prompt") ?? true, body["tools"] as JsonArray,
                body["chat_template_kwargs"] as JsonObject);
            // Chat's logprobs: true with top_logprobs alternatives (0-20).
            int? top = Flag(body, "logprobs") == true ? TopCount(Number(body, "top_logprobs") ?? 0, "top_logprobs")
                : Number(body, "top_logprobs") != null ? throw new BadRequest("top_logprobs needs logprobs: true") : null;
            var request = Sampling(body, prompt, variant, Number(body, "max_completion_tokens") ?? Number(body, "max_tokens")) with { AddBos = false, TopLogprobs = top };
            int n = Choices(body);
            if (top != null && Flag(body, "stream") == true) throw new BadRequest("streamed log probabilities are not supported; ask without stream");
            string id = "chatcmpl-" + Guid.NewGuid().ToString("N");
            var cancel = context.RequestAborted;
            if (Flag(body, "stream") == true)
            {
                await Stream(context, server.Start(request, cancel),
                    piece => ChatChunk(id, created, name, new JsonObject { ["content"] = piece }, null),
                    done => ChatChunk(id, created, name, new JsonObject(), done.FinishReason, Usage(new[] { done })),
                    ChatChunk(id, created, name, new JsonObject { ["role"] = "assistant", ["content"] = "" }, null));
                return Results.Empty;
            }

            var results = await Task.WhenAll(Copies(request, n).Select(r => server.GenerateAsync(r, cancel)));
            return Results.Json(new JsonObject
            {
                ["id"] = id,
                ["object"] = "chat.completion",
                ["created"] = created,
                ["model"] = name,
                ["choices"] = new JsonArray(results.Select((result, i) => (JsonNode)new JsonObject
                {
                    ["index"] = i,
                    ["message"] = new JsonObject { ["role"] = "assistant", ["content"] = result.Completion },
                    ["logprobs"] = result.Logprobs == null ? null : ChatLogprobs(server.Model, result.Logprobs),
                    ["finish_reason"] = result.FinishReason,
                }).ToArray()),
                ["usage"] = Usage(results, n),
            });
        });
        app.MapPost("/v1/completions", async (HttpContext context) =>
        {
            var body = await ReadBody(context.Request);
            var (name, variant, known) = ModelOf(body, server, modelName);
            if (!known) return Error(404, "NotFoundError", $"The model `{name}` does not exist.");
            // OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of such lists.
            const string Forms = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids";
            static int[] Ids(JsonArray a) => a.Select(t => t is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<int>(out int id) ? id
                : throw new BadRequest(Forms)).ToArray();
            var prompts = body["prompt"] switch
            {
                JsonValue v when v.GetValueKind() == JsonValueKind.String => new (string, int[]?)[] { (v.GetValue<string>(), null) },
                JsonArray { Count: > 0 } a when a.All(p => p?.GetValueKind() == JsonValueKind.Number) => new (string, int[]?)[] { ("", Ids(a)) },
                JsonArray a when a.All(p => p is JsonArray) => a.Select(p => ("", (int[]?)Ids((JsonArray)p!))).ToArray(),
                JsonArray a => a.Select(p => (p?.GetValueKind() == JsonValueKind.String ? p.GetValue<string>() : throw new BadRequest(Forms), (int[]?)null)).ToArray(),
                _ => throw new BadRequest(Forms),
            };
            if (prompts.Length == 0) throw new BadRequest("prompt is an empty list");
            int n = Choices(body);
            // Completions' logprobs: the number of alternatives per token (0-20).
            int? top = Number(body, "logprobs") is { } lp ? TopCount(lp, "logprobs") : null;
            bool echo = Flag(body, "echo") == true; // the prompt before the completion, and with logprobs the prompt's scores too
            if ((top != null || echo) && Flag(body, "stream") == true) throw new BadRequest("streamed log probabilities and echo are not supported; ask without stream");
            var requests = prompts.SelectMany(p => Copies(Sampling(body, p.Item1, variant, Number(body, "max_tokens"))
                with { PromptTokens = p.Item2, TopLogprobs = top, PromptLogprobs = echo && top != null }, n)).ToArray();
            string id = "cmpl-" + Guid.NewGuid().ToString("N");
            var cancel = context.RequestAborted;
            if (Flag(body, "stream") == true)
            {
                if (requests.Length != 1) throw new BadRequest("streaming takes one prompt");
                await Stream(context, server.Start(requests[0], cancel),
                    piece => Chunk(id, created, name, piece, null),
                    done => Chunk(id, created, name, "", done.FinishReason, Usage(new[] { done })));
                return Results.Empty;
            }

            var results = await Task.WhenAll(requests.Select(r => server.GenerateAsync(r, cancel)));
            return Results.Json(new JsonObject
            {
                ["id"] = id,
                ["object"] = "text_completion",
                ["created"] = created,
                ["model"] = name,
                ["choices"] = new JsonArray(results.Select((r, i) =>
                {
                    string? echoed = echo ? Echoed(server.Model, r.Request) : null;
                    return (JsonNode)new JsonObject
                    {
                        ["index"] = i, ["text"] = echoed + r.Completion,
                        ["logprobs"] = r.Logprobs == null ? null : CompletionLogprobs(server.Model, r, echoed), ["finish_reason"] = r.FinishReason,
                    };
                }).ToArray()),
                ["usage"] = Usage(results, n),
            });
        });
        app.Use(async (context, next) =>
        {
            try
            {
                await next(context);
            }
            catch (Exception e) when (e is BadRequest or ArgumentException or JsonException or NotSupportedException or IOException or InvalidOperationException or PeftSharpInputException)
            {
                if (context.Response.HasStarted) return;
                await Error(e is InvalidOperationException && e.Message.Contains("shutting down") ? 503 : 400, "BadRequestError", e.Message).ExecuteAsync(context);
            }
        });
        return app;
    }

    /// <summary>The server's state in Prometheus' text format, under vLLM's metric names (model_name labels the base).</summary>
    public static string Prometheus(ServerStats s, string modelName)
    {
        var sb = new StringBuilder();
        string label = $"model_name=\"{modelName}\"";
        void Metric(string name, string type, string help, string value, string labels)
        {
            sb.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
            sb.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
            sb.Append(name).Append('{').Append(labels).Append("} ").Append(value).Append('\n');
        }

        string F(double v) => v.ToString("R", CultureInfo.InvariantCulture);
        Metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", F(s.Running), label);
        Metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", F(s.Waiting), label);
        Metric("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage: the fraction of KV blocks in use (1 means 100 percent).", F(s.KvUsage), label);
        Metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage (vLLM's newer name for the same figure).", F(s.KvUsage), label);
        Metric("vllm:lora_requests_info", "gauge", "Running stats on LoRA requests.", F(DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0),
            $"max_lora=\"{s.MaxLoras}\",running_lora_adapters=\"{string.Join(",", s.RunningAdapters)}\",waiting_lora_adapters=\"{string.Join(",", s.WaitingAdapters)}\"");
        Metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", F(s.PromptTokens), label);
        Metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", F(s.GenerationTokens), label);
        Metric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens whose keys and values came from the prefix cache.", F(s.CachedPromptTokens), label);
        void Histogram(string name, string help, LatencyHistogram h)
        {
            sb.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
            sb.Append("# TYPE ").Append(name).Append(" histogram\n");
            for (int i = 0; i < h.Bounds.Count; i++)
            {
                sb.Append(name).Append("_bucket{le=\"").Append(F(h.Bounds[i])).Append("\",").Append(label).Append("} ").Append(h.CumulativeCounts[i]).Append('\n');
            }

            sb.Append(name).Append("_bucket{le=\"+Inf\",").Append(label).Append("} ").Append(h.Count).Append('\n');
            sb.Append(name).Append("_sum{").Append(label).Append("} ").Append(F(h.Sum)).Append('\n');
            sb.Append(name).Append("_count{").Append(label).Append("} ").Append(h.Count).Append('\n');
        }

        Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.TimeToFirstToken);
        Histogram("vllm:request_queue_time_seconds", "Histogram of time spent waiting in the queue in seconds.", s.QueueTime);
        Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", s.EndToEnd);
        Metric("peftsharp:kv_blocks", "gauge", "KV blocks in all.", F(s.KvBlocks), label);
        Metric("peftsharp:finished_requests_total", "counter", "Requests that ended (finished, cancelled or failed).", F(s.FinishedRequests), label);
        return sb.ToString();
    }

    private static JsonNode ModelCard(string id, string? parent, long created) => new JsonObject
    {
        ["id"] = id, ["object"] = "model", ["created"] = created, ["owned_by"] = "peftsharp", ["root"] = parent ?? id, ["parent"] = parent,
    };

    private static JsonObject Chunk(string id, long created, string model, string text, string? finish, JsonNode? usage = null) => new()
    {
        ["id"] = id,
        ["object"] = "text_completion",
        ["created"] = created,
        ["model"] = model,
        ["choices"] = new JsonArray(new JsonObject { ["index"] = 0, ["text"] = text, ["logprobs"] = null, ["finish_reason"] = finish }),
        ["usage"] = usage,
    };

    /// <summary>The request's sampling fields (OpenAI's defaults: 16 tokens, temperature 1, a fresh seed when none is given).</summary>
    private static GenerationRequest Sampling(JsonObject body, string prompt, string? variant, double? maxTokens)
    {
        return new GenerationRequest(prompt, variant, MaxTokens: (int)(maxTokens ?? 16), Temperature: (float)(Number(body, "temperature") ?? 1.0),
            TopP: (float)(Number(body, "top_p") ?? 1.0), Seed: Number(body, "seed") is { } seed ? (int)seed : Random.Shared.Next())
        {
            Stop = Stops(body),
        };
    }

    /// <summary>The body's model: the base (its served name or "base") is a null variant; whether the server knows it.</summary>
    private static (string Name, string? Variant, bool Known) ModelOf(JsonObject body, VariantServer server, string modelName)
    {
        string name = Text(body, "model") ?? modelName;
        string? variant = name == modelName || name == "base" ? null : name;
        return (name, variant, server.Knows(variant));
    }

    /// <summary>OpenAI messages as templates take them: a content list of text parts becomes one string (joined by newlines, as vLLM does).</summary>
    private static JsonArray ChatMessages(JsonArray messages)
    {
        var result = new JsonArray();
        foreach (var m in messages)
        {
            if (m is not JsonObject o || o["role"]?.GetValueKind() != JsonValueKind.String) throw new BadRequest("each message must be an object with a string role");
            var copy = o.DeepClone().AsObject();
            if (o["content"] is JsonArray parts)
            {
                copy["content"] = string.Join("\n", parts.Select(p => p is JsonObject po && po["type"]?.GetValue<string>() == "text" && po["text"] is JsonValue t
                    ? t.GetValue<string>()
                    : throw new BadRequest("only text content parts are supported")));
            }

            result.Add(copy);
        }

        return result;
    }

    private static JsonObject ChatChunk(string id, long created, string model, JsonObject delta, string? finish, JsonNode? usage = null) => new()
    {
        ["id"] = id,
        ["object"] = "chat.completion.chunk",
        ["created"] = created,
        ["model"] = model,
        ["choices"] = new JsonArray(new JsonObject { ["index"] = 0, ["delta"] = delta, ["logprobs"] = null, ["finish_reason"] = finish }),
        ["usage"] = usage,
    };

    private static int TopCount(double given, string field) =>
        given == Math.Floor(given) && given >= 0 && given <= VariantServer.MaxTopLogprobs ? (int)given
            : throw new BadRequest($"{field} must be a whole number from 0 to {VariantServer.MaxTopLogprobs}");

    private static string TokenText(PeftSharp.Model.LlamaModel model, int token) => model.Tokenizer.Decode(new[] { token });

    /// <summary>The UTF-8 bytes of a token's text, as vLLM reports them (a token that is part of a character decodes to U+FFFD).</summary>
    private static JsonArray TokenBytes(string text) => new(Encoding.UTF8.GetBytes(text).Select(b => (JsonNode)(int)b).ToArray());

    /// <summary>Chat's choice.logprobs: content[] of {token, logprob, bytes, top_logprobs[]}.</summary>
    private static JsonObject ChatLogprobs(PeftSharp.Model.LlamaModel model, IReadOnlyList<TokenLogprob> logprobs) => new()
    {
        ["content"] = new JsonArray(logprobs.Select(l =>
        {
            string text = TokenText(model, l.Token);
            return (JsonNode)new JsonObject
            {
                ["token"] = text, ["logprob"] = l.Logprob, ["bytes"] = TokenBytes(text),
                ["top_logprobs"] = new JsonArray(l.Top.Select(t => (JsonNode)new JsonObject
                {
                    ["token"] = TokenText(model, t.Token), ["logprob"] = t.Logprob, ["bytes"] = TokenBytes(TokenText(model, t.Token)),
                }).ToArray()),
            };
        }).ToArray()),
        ["refusal"] = null,
    };

    /// <summary>The prompt as echo prints it: its text, or its token ids decoded.</summary>
    private static string Echoed(PeftSharp.Model.LlamaModel model, GenerationRequest r) => r.PromptTokens is { } ids ? model.Tokenizer.Decode(ids) : r.Prompt;

    /// <summary>
    /// Completions' choice.logprobs: tokens, token_logprobs, top_logprobs ({text: logprob}) and text_offset, over the
    /// tokens the completion kept; with <paramref name="echoed"/>, the prompt's tokens first (the first one unscored).
    /// </summary>
    private static JsonObject CompletionLogprobs(PeftSharp.Model.LlamaModel model, GenerationResult r, string? echoed)
    {
        var tokens = new JsonArray();
        var values = new JsonArray();
        var tops = new JsonArray();
        var offsets = new JsonArray();
        JsonObject Top(TokenLogprob l)
        {
            var top = new JsonObject();
            foreach (var (t, lp) in l.Top) top[TokenText(model, t)] ??= lp; // tokens that decode alike keep the likelier
            return top;
        }

        if (echoed != null && r.PromptTokenIds is { } ids && r.PromptLogprobs is { } scores)
        {
            for (int i = 0; i < ids.Count; i++)
            {
                tokens.Add(TokenText(model, ids[i]));
                values.Add(scores[i] is { } s ? s.Logprob : null);
                tops.Add(scores[i] is { } t ? Top(t) : null);
                offsets.Add(Math.Min(echoed.Length, model.Tokenizer.Decode(ids.Take(i)).Length));
            }
        }

        int shift = echoed?.Length ?? 0;
        var kept = new List<int>();
        foreach (var l in r.Logprobs!)
        {
            int offset = model.Tokenizer.Decode(kept).Length;
            if (offset >= r.Completion.Length && (kept.Count > 0 || r.Completion.Length == 0)) break; // past a stop text's cut
            kept.Add(l.Token);
            tokens.Add(TokenText(model, l.Token));
            values.Add(l.Logprob);
            tops.Add(Top(l));
            offsets.Add(shift + offset);
        }

        return new JsonObject { ["tokens"] = tokens, ["token_logprobs"] = values, ["top_logprobs"] = tops, ["text_offset"] = offsets };
    }

    /// <summary>OpenAI's n: choices per prompt, 1 to 128; streaming takes one.</summary>
    private static int Choices(JsonObject body)
    {
        int n = Number(body, "n") is not { } given ? 1
            : given == Math.Floor(given) && given >= 1 && given <= MaxChoices ? (int)given : throw new BadRequest($"n must be a whole number from 1 to {MaxChoices}");
        if (n > 1 && Flag(body, "stream") == true) throw new BadRequest("streaming takes n = 1");
        return n;
    }

    private const int MaxChoices = 128;

    /// <summary>
    /// The request and n - 1 copies, each its own sample: seeds seed, seed + 1, ... (reproducible with a given seed; the
    /// copies read the first's prompt blocks from the prefix cache).
    /// </summary>
    private static IEnumerable<GenerationRequest> Copies(GenerationRequest r, int n) => Enumerable.Range(0, n).Select(i => r with { Seed = unchecked(r.Seed + i) });

    /// <summary>Token counts: each prompt once (n choices of a prompt share it), every choice's completion.</summary>
    private static JsonObject Usage(IReadOnlyList<GenerationResult> results, int n = 1)
    {
        var prompts = results.Where((_, i) => i % n == 0).ToList(); // the first choice of each prompt
        int prompt = prompts.Sum(r => r.PromptTokens), completion = results.Sum(r => r.Tokens);
        return new JsonObject
        {
            ["prompt_tokens"] = prompt,
            ["completion_tokens"] = completion,
            ["total_tokens"] = prompt + completion,
            ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = prompts.Sum(r => r.CachedPromptTokens) }, // read from the prefix cache
        };
    }

    /// <summary>
    /// A request's text as server-sent events: <paramref name="first"/> when given, one event per streamed piece, the
    /// last event from the result (finish reason, usage), then <c>[DONE]</c>.
    /// </summary>
    private static async Task Stream(HttpContext context, ServerRequest handle, Func<string, JsonNode> piece, Func<GenerationResult, JsonNode> last,
        JsonNode? first = null)
    {
        var cancel = context.RequestAborted;
        context.Response.ContentType = "text/event-stream";
        if (first != null) await Event(context.Response, first, cancel);
        await foreach (var text in handle.Text.ReadAllAsync(cancel)) await Event(context.Response, piece(text), cancel);
        await Event(context.Response, last(await handle.Result), cancel);
        await context.Response.WriteAsync("data: [DONE]\n\n", cancel);
    }

    private static async Task Event(HttpResponse response, JsonNode data, CancellationToken cancel)
    {
        await response.WriteAsync("data: " + data.ToJsonString() + "\n\n", cancel);
        await response.Body.FlushAsync(cancel);
    }

    private static async Task<JsonObject> ReadBody(HttpRequest http)
    {
        var node = await JsonNode.ParseAsync(http.Body);
        return node as JsonObject ?? throw new BadRequest("the request body must be a JSON object");
    }

    private static string? Text(JsonObject body, string key) => body[key] switch
    {
        null => null,
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
        _ => throw new BadRequest($"{key} must be a string"),
    };

    private static double? Number(JsonObject body, string key) => body[key] switch
    {
        null => null,
        JsonValue v when v.GetValueKind() == JsonValueKind.Number => v.GetValue<double>(),
        _ => throw new BadRequest($"{key} must be a number"),
    };

    private static bool? Flag(JsonObject body, string key) => body[key] switch
    {
        null => null,
        JsonValue v when v.GetValueKind() is JsonValueKind.True or JsonValueKind.False => v.GetValue<bool>(),
        JsonValue v when v.GetValueKind() == JsonValueKind.Null => null,
        _ => throw new BadRequest($"{key} must be true or false"),
    };

    private static string[] Stops(JsonObject body) => body["stop"] switch
    {
        null => Array.Empty<string>(),
        JsonValue v when v.GetValueKind() == JsonValueKind.String => new[] { v.GetValue<string>() },
        JsonArray a => a.Select(x => x?.GetValueKind() == JsonValueKind.String ? x.GetValue<string>() : throw new BadRequest("stop must be a string or a list of strings")).ToArray(),
        _ => throw new BadRequest("stop must be a string or a list of strings"),
    };

    private static IResult Error(int status, string type, string message) =>
        Results.Json(new JsonObject { ["error"] = new JsonObject { ["message"] = message, ["type"] = type, ["code"] = status } }, statusCode: status);

    /// <summary>A request the server cannot take as given: answered 400 with OpenAI's error body.</summary>
    private sealed class BadRequest(string message) : Exception(message);
}
