using System.ClientModel;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json.Nodes;
using NUnit.Framework;
using OpenAI;
using OpenAI.Chat;
using OpenAI.Models;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Tests.Managed;
using PeftSharp.Trainer.Commands;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Host;

/// <summary>
/// `peft serve`'s endpoints over loopback HTTP: completions and chat (plain and streamed, also through the official
/// OpenAI client), models, adapters loaded and unloaded live, metrics.
/// </summary>
public sealed class ServeTests : TempDirectoryTest
{
    [Test]
    public async Task Endpoints_OverLoopback_GiveWhatTheLibraryGives()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 43);
        var lora = ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 500, scaleB: 0.5f);
        string folder = Path.Combine(TempDir, "adapter");
        lora.Save(folder, model.Config);
        using var server = new VariantServer(model, new VariantServerOptions { MaxLoras = 2 });
        await using var app = OpenAiEndpoints.Build(server, "tiny", "http://127.0.0.1:0");
        await app.StartAsync();
        using var http = new HttpClient { BaseAddress = new Uri(app.Urls.First()) };

        Assert.That((await http.GetAsync("/health")).StatusCode, Is.EqualTo(HttpStatusCode.OK));
        var load = await http.PostAsJsonAsync("/v1/load_lora_adapter", new { lora_name = "ad", lora_path = folder });
        Assert.That(load.StatusCode, Is.EqualTo(HttpStatusCode.OK), await load.Content.ReadAsStringAsync());
        var models = JsonNode.Parse(await http.GetStringAsync("/v1/models"))!["data"]!.AsArray().Select(m => m!["id"]!.GetValue<string>());
        Assert.That(models, Is.EqualTo(new[] { "tiny", "ad" }));
        // The official OpenAI .NET client reads the same list (its completions client is internal in 2.x, and chat needs templates).
        var client = new OpenAIModelClient(new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = new Uri(http.BaseAddress, "/v1") });
        Assert.That((await client.GetModelsAsync()).Value.Select(m => m.Id), Is.EqualTo(new[] { "tiny", "ad" }));

        string expectedAd, expectedBase;
        using (var set = new VariantSet(model))
        {
            set.AddLora("ad", PeftLoraAdapter.Load(folder, model));
            expectedAd = BatchGenerator.Generate(model, new[] { new GenerationRequest("hello", "ad", MaxTokens: 8) }, set)[0].Completion;
            expectedBase = Generator.Greedy(model, "hello", 8);
        }

        Assert.That(expectedAd, Is.Not.EqualTo(expectedBase), "the adapter changes the output, so serving the wrong one would show");
        var plain = await Post(http, "/v1/completions", new { model = "ad", prompt = "hello", max_tokens = 8, temperature = 0 });
        Assert.That(plain["choices"]![0]!["text"]!.GetValue<string>(), Is.EqualTo(expectedAd));
        Assert.That(plain["usage"]!["completion_tokens"]!.GetValue<int>(), Is.LessThanOrEqualTo(8));
        var onBase = await Post(http, "/v1/completions", new { model = "tiny", prompt = "hello", max_tokens = 8, temperature = 0 });
        Assert.That(onBase["choices"]![0]!["text"]!.GetValue<string>(), Is.EqualTo(expectedBase));

        // Streamed: server-sent events whose texts make the same completion, a finish reason, then [DONE].
        var stream = await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = "hello", max_tokens = 8, temperature = 0, stream = true });
        var events = (await stream.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries).Select(e => e["data: ".Length..]).ToList();
        Assert.That(stream.Content.Headers.ContentType!.MediaType, Is.EqualTo("text/event-stream"));
        Assert.That(events[^1], Is.EqualTo("[DONE]"));
        var chunks = events.SkipLast(1).Select(e => JsonNode.Parse(e)!["choices"]![0]!).ToList();
        Assert.That(string.Concat(chunks.Select(c => c["text"]!.GetValue<string>())), Is.EqualTo(expectedAd));
        Assert.That(chunks[^1]["finish_reason"]!.GetValue<string>(), Is.AnyOf("stop", "length"));

        var metrics = await http.GetStringAsync("/metrics");
        Assert.That(metrics, Does.Contain("vllm:num_requests_running{model_name=\"tiny\"} 0"));
        Assert.That(metrics, Does.Contain("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}"));
        Assert.That(metrics, Does.Match(@"vllm:generation_tokens_total\{model_name=""tiny""\} [1-9]"));
        // Latency histograms under vLLM's names: three requests finished (plain, base, streamed), each counted once, in
        // cumulative buckets that never decrease and end at the count.
        foreach (var histogram in new[] { "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds", "vllm:e2e_request_latency_seconds" })
        {
            Assert.That(metrics, Does.Contain($"# TYPE {histogram} histogram"));
            Assert.That(metrics, Does.Contain($"{histogram}_count{{model_name=\"tiny\"}} 3"));
            Assert.That(metrics, Does.Contain($"{histogram}_bucket{{le=\"+Inf\",model_name=\"tiny\"}} 3"));
            var buckets = metrics.Split('\n').Where(l => l.StartsWith(histogram + "_bucket{", StringComparison.Ordinal)).Select(l => long.Parse(l[(l.LastIndexOf(' ') + 1)..])).ToList();
            Assert.That(buckets, Is.Ordered, histogram);
            Assert.That(buckets[^2], Is.EqualTo(3), $"{histogram}: every request took less than the last bound");
        }

        Assert.That(metrics, Does.Match(@"vllm:e2e_request_latency_seconds_sum\{model_name=""tiny""\} 0\.\d+"));

        // Token-id prompts (OpenAI's and vLLM's list forms) are used as given: the string prompt's ids with BOS give its text.
        var ids = model.Tokenizer.EncodeStart("hello").ToArray();
        var byIds = await Post(http, "/v1/completions", new { model = "ad", prompt = ids, max_tokens = 8, temperature = 0 });
        Assert.That(byIds["choices"]![0]!["text"]!.GetValue<string>(), Is.EqualTo(expectedAd));
        Assert.That(byIds["usage"]!["prompt_tokens"]!.GetValue<int>(), Is.EqualTo(ids.Length));
        var twoById = await Post(http, "/v1/completions", new { model = "ad", prompt = new[] { ids, ids[..^1] }, max_tokens = 8, temperature = 0 });
        Assert.That(twoById["choices"]!.AsArray().Select(c => c!["text"]!.GetValue<string>()).First(), Is.EqualTo(expectedAd));
        Assert.That(twoById["choices"]!.AsArray(), Has.Count.EqualTo(2));
        var badId = await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = new[] { 1, model.Config.VocabSize } });
        Assert.That(badId.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        Assert.That(await badId.Content.ReadAsStringAsync(), Does.Contain("outside the vocabulary"));

        // n choices of one prompt: seeds seed, seed + 1, ...; the prompt counted once.
        var three = await Post(http, "/v1/completions", new { model = "ad", prompt = "hello", max_tokens = 6, temperature = 1, seed = 7, n = 3 });
        var texts = three["choices"]!.AsArray().Select(c => c!["text"]!.GetValue<string>()).ToList();
        Assert.That(three["choices"]!.AsArray().Select(c => c!["index"]!.GetValue<int>()), Is.EqualTo(new[] { 0, 1, 2 }));
        for (int i = 0; i < 3; i++)
        {
            var alone = await server.GenerateAsync(new GenerationRequest("hello", "ad", MaxTokens: 6, Temperature: 1, Seed: 7 + i));
            Assert.That(texts[i], Is.EqualTo(alone.Completion), $"choice {i}");
        }

        Assert.That(texts.Distinct().Count(), Is.GreaterThan(1), "three samples at temperature 1 differ");
        Assert.That(three["usage"]!["prompt_tokens"]!.GetValue<int>(), Is.EqualTo(ids.Length));
        // Completions' logprobs: tokens, their log probabilities, alternatives and offsets into the text.
        var scoredText = await Post(http, "/v1/completions", new { model = "ad", prompt = "hello", max_tokens = 8, temperature = 0, logprobs = 2 });
        var lp = scoredText["choices"]![0]!["logprobs"]!;
        var lpTokens = lp["tokens"]!.AsArray().Select(t => t!.GetValue<string>()).ToList();
        var offsets = lp["text_offset"]!.AsArray().Select(v => v!.GetValue<int>()).ToList();
        Assert.That(lpTokens, Has.Count.EqualTo(scoredText["usage"]!["completion_tokens"]!.GetValue<int>()));
        var values = lp["token_logprobs"]!.AsArray().Select(v => v!.GetValue<double>()).ToList();
        Assert.That(values, Has.Count.EqualTo(lpTokens.Count));
        Assert.That(values, Has.All.LessThanOrEqualTo(0.0));
        Assert.That(offsets, Has.Count.EqualTo(lpTokens.Count));
        Assert.That(offsets, Is.Ordered);
        Assert.That(offsets, Has.All.InRange(0, expectedAd.Length));
        Assert.That(offsets[0], Is.EqualTo(0));
        // A byte token that is part of a character reads as U+FFFD alone (as vLLM shows it); whole ones sit at their offsets.
        for (int i = 0; i < lpTokens.Count; i++)
        {
            if (!lpTokens[i].Contains('\uFFFD')) Assert.That(expectedAd.Substring(offsets[i], lpTokens[i].Length), Is.EqualTo(lpTokens[i]), $"token {i}");
        }

        Assert.That(lp["top_logprobs"]!.AsArray().Select(o => o!.AsObject().Count), Has.All.InRange(1, 2));
        // Scoring a prompt as evaluation harnesses do (echo, logprobs, max_tokens 0): each prompt token's log probability
        // given the ones before it, as the model's own every-position forward gives it; the first token is unscored.
        const string scoredPrompt = "hello world, scored";
        var promptIds = model.Tokenizer.EncodeStart(scoredPrompt).ToArray();
        float[][] everyLogits;
        using (var cache = new KvCache(model, promptIds.Length))
        {
            everyLogits = model.DecodeBatchEveryPosition(new[] { cache }, new[] { promptIds });
        }

        foreach (int maxTokens in new[] { 0, 3 })
        {
            var echoed = await Post(http, "/v1/completions", new { model = "tiny", prompt = scoredPrompt, max_tokens = maxTokens, echo = true, logprobs = 1, temperature = 0 });
            var choice = echoed["choices"]![0]!;
            Assert.That(choice["text"]!.GetValue<string>(), Does.StartWith(scoredPrompt));
            var scores = choice["logprobs"]!["token_logprobs"]!.AsArray();
            Assert.That(scores, Has.Count.EqualTo(promptIds.Length + echoed["usage"]!["completion_tokens"]!.GetValue<int>()));
            Assert.That(scores[0], Is.Null);
            Assert.That(choice["logprobs"]!["top_logprobs"]!.AsArray()[0], Is.Null);
            for (int i = 1; i < promptIds.Length; i++)
            {
                double expected = everyLogits[i - 1][promptIds[i]] - PeftSharp.Kernels.Core.CrossEntropyReference.LogSumExp(everyLogits[i - 1]);
                Assert.That(scores[i]!.GetValue<double>(), Is.EqualTo(expected).Within(1e-5), $"prompt token {i} (max_tokens {maxTokens})");
            }

            Assert.That(echoed["usage"]!["prompt_tokens_details"]!["cached_tokens"]!.GetValue<int>(), Is.EqualTo(0), "a scored prompt is computed whole");
        }

        var plainEcho = await Post(http, "/v1/completions", new { model = "ad", prompt = "hello", max_tokens = 8, echo = true, temperature = 0 });
        Assert.That(plainEcho["choices"]![0]!["text"]!.GetValue<string>(), Is.EqualTo("hello" + expectedAd));
        var streamedScores = await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = "hello", logprobs = 1, stream = true });
        Assert.That(streamedScores.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        var nStream = await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = "hello", n = 2, stream = true });
        Assert.That(nStream.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));

        var unknown = await http.PostAsJsonAsync("/v1/completions", new { model = "nope", prompt = "x" });
        Assert.That(unknown.StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
        Assert.That(JsonNode.Parse(await unknown.Content.ReadAsStringAsync())!["error"]!["message"]!.GetValue<string>(), Does.Contain("nope"));
        var bad = await http.PostAsJsonAsync("/v1/completions", new { model = "tiny", prompt = 5 });
        Assert.That(bad.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        var noTemplate = await http.PostAsJsonAsync("/v1/chat/completions", new { model = "tiny", messages = new[] { new { role = "user", content = "x" } } });
        Assert.That(noTemplate.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        Assert.That(await noTemplate.Content.ReadAsStringAsync(), Does.Contain("chat template"));
        Assert.That((await http.PostAsJsonAsync("/v1/unload_lora_adapter", new { lora_name = "ad" })).StatusCode, Is.EqualTo(HttpStatusCode.OK));
        Assert.That((await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = "x" })).StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
        Assert.That((await http.PostAsJsonAsync("/v1/unload_lora_adapter", new { lora_name = "ad" })).StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
        await app.StopAsync();
    }

    [Test]
    public async Task ChatCompletions_WithTheOpenAiClient_AdapterAsModel_StreamedOrNot_LoadUnloadWhileRunning()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 43);
        string Save(string name, int seed)
        {
            string folder = Path.Combine(TempDir, name);
            ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, seed, scaleB: 0.5f).Save(folder, model.Config);
            return folder;
        }

        string first = Save("ad", 500), second = Save("ad2", 501);
        const string source = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}"
            + "{% if messages[-1].role == 'system' %}{{ raise_exception('a system message cannot come last') }}{% endif %}"
            + "{% if add_generation_prompt %}<assistant>{% endif %}";
        var template = ChatTemplate.Parse(source, "test template", new Dictionary<string, string> { ["bos_token"] = "^" });
        using var server = new VariantServer(model, new VariantServerOptions { MaxLoras = 2 });
        server.Load("ad", VariantFolder.Load(first, model));
        await using var app = OpenAiEndpoints.Build(server, "tiny", "http://127.0.0.1:0", template);
        await app.StartAsync();
        var endpoint = new Uri(new Uri(app.Urls.First()), "/v1");
        ChatClient Client(string name) => new(name, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = endpoint });
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 8, Temperature = 0 };
        ChatMessage[] conversation = { new SystemChatMessage("be brief"), new UserChatMessage("hello ") };
        string rendered = "^<system>be brief\n<user>hello\n<assistant>";
        Assert.That(template.Render(new JsonArray(new JsonObject { ["role"] = "system", ["content"] = "be brief" }, new JsonObject { ["role"] = "user", ["content"] = "hello " })),
            Is.EqualTo(rendered));
        async Task<string> Alone(string? variant, int tokens) =>
            (await server.GenerateAsync(new GenerationRequest(rendered, variant, MaxTokens: tokens) { AddBos = false })).Completion;

        string expectedAd = await Alone("ad", 8), expectedBase = await Alone(null, 8);
        Assert.That(expectedAd, Is.Not.EqualTo(expectedBase), "the adapter changes the output, so serving the wrong one would show");
        var plain = (await Client("ad").CompleteChatAsync(conversation, options)).Value;
        Assert.That(plain.Content[0].Text, Is.EqualTo(expectedAd));
        Assert.That(plain.Usage.OutputTokenCount, Is.LessThanOrEqualTo(8));
        Assert.That(plain.Usage.InputTokenCount, Is.EqualTo(model.Tokenizer.Encode(rendered).Length), "the rendered prompt, no BOS added on top");
        Assert.That((await Client("tiny").CompleteChatAsync(conversation, options)).Value.Content[0].Text, Is.EqualTo(expectedBase));
        string streamed = "";
        await foreach (var update in Client("ad").CompleteChatStreamingAsync(conversation, options))
        {
            streamed += string.Concat(update.ContentUpdate.Select(p => p.Text));
        }

        Assert.That(streamed, Is.EqualTo(expectedAd));

        // Log probabilities through the client: each token's and its 3 likeliest alternatives, as the model's own
        // log-softmax at that position gives them (the first position computed here from the rendered prompt).
        var scoring = new ChatCompletionOptions { MaxOutputTokenCount = 4, Temperature = 0, IncludeLogProbabilities = true, TopLogProbabilityCount = 3 };
        var scored = (await Client("tiny").CompleteChatAsync(conversation, scoring)).Value;
        var logprobs = scored.ContentTokenLogProbabilities;
        Assert.That(logprobs, Has.Count.EqualTo(scored.Usage.OutputTokenCount));
        Assert.That(logprobs.Where(l => !l.Token.Contains('\uFFFD')).Select(l => l.Token), Is.All.Matches<string>(t => scored.Content[0].Text.Contains(t, StringComparison.Ordinal)));
        float[] firstLogits;
        var promptIds = model.Tokenizer.Encode(rendered);
        using (var cache = new KvCache(model, promptIds.Length))
        {
            firstLogits = model.DecodeBatch(new[] { cache }, new[] { promptIds })[0];
        }

        double lse = PeftSharp.Kernels.Core.CrossEntropyReference.LogSumExp(firstLogits);
        var best = Enumerable.Range(0, firstLogits.Length).OrderByDescending(v => firstLogits[v]).Take(3).Select(v => firstLogits[v] - lse).ToArray();
        // The server's logits come from the same fp32 forward; the log-softmax is taken in double on both sides.
        const double LogprobTolerance = 1e-5;
        Assert.That(logprobs[0].LogProbability, Is.EqualTo(best[0]).Within(LogprobTolerance), "greedy: the chosen token is the likeliest");
        Assert.That(logprobs[0].TopLogProbabilities.Select(t => (double)t.LogProbability), Is.EqualTo(best).Within(LogprobTolerance));
        Assert.That(logprobs.All(l => l.LogProbability <= 0 && l.TopLogProbabilities.Count == 3));

        // While a long streamed chat on "ad" runs: load "ad2" and unload "ad". The running one finishes unchanged.
        using var http = new HttpClient { BaseAddress = new Uri(app.Urls.First()) };
        string expectedLong = await Alone("ad", 40);
        var longOptions = new ChatCompletionOptions { MaxOutputTokenCount = 40, Temperature = 0 };
        string running = "";
        bool changed = false;
        await foreach (var update in Client("ad").CompleteChatStreamingAsync(conversation, longOptions))
        {
            running += string.Concat(update.ContentUpdate.Select(p => p.Text));
            if (changed || running.Length == 0) continue;
            changed = true;
            Assert.That((await http.PostAsJsonAsync("/v1/load_lora_adapter", new { lora_name = "ad2", lora_path = second })).StatusCode, Is.EqualTo(HttpStatusCode.OK));
            Assert.That((await http.PostAsJsonAsync("/v1/unload_lora_adapter", new { lora_name = "ad" })).StatusCode, Is.EqualTo(HttpStatusCode.OK));
        }

        Assert.That(changed, Is.True, "the load and unload happened while the request ran");
        Assert.That(running, Is.EqualTo(expectedLong));
        var gone = Assert.ThrowsAsync<ClientResultException>(async () => await Client("ad").CompleteChatAsync(conversation, options))!;
        Assert.That(gone.Status, Is.EqualTo(404));
        string expectedAd2 = await Alone("ad2", 8);
        Assert.That((await Client("ad2").CompleteChatAsync(conversation, options)).Value.Content[0].Text, Is.EqualTo(expectedAd2));

        // The template's raise_exception reaches the client as a 400 with its message.
        var refused = Assert.ThrowsAsync<ClientResultException>(async () => await Client("tiny").CompleteChatAsync(new ChatMessage[] { new SystemChatMessage("x") }, options))!;
        Assert.That(refused.Status, Is.EqualTo(400));
        Assert.That(refused.Message, Does.Contain("a system message cannot come last"));
        await app.StopAsync();
    }

    [Test]
    public async Task ActivatedLora_ThroughTheOpenAiClient_ReusesTheBasesCachedPrompt_AndRefusesAPromptWithoutItsInvocation()
    {
        using var device = new CpuDevice();
        using var model = ServingTests.UnitScaleTiny(device, 45);
        var plain = ServingTests.Adapter(model.Config, 4, LoraAdapterConfig.LlamaLinear, 520, scaleB: 0.5f);
        var activated = new PeftLoraAdapter(plain.Config with { AloraInvocationTokens = model.Tokenizer.Encode("<ask>").ToList() }, plain.Modules);
        string folder = Path.Combine(TempDir, "alora");
        activated.Save(folder, model.Config);
        // The adapter's invocation is the template's generation prompt, as IBM's intrinsics invoke theirs by a role header.
        var template = ChatTemplate.Parse("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<ask>{% endif %}", "t",
            new Dictionary<string, string>());
        using var server = new VariantServer(model, new VariantServerOptions { BlockSize = 4 });
        await using var app = OpenAiEndpoints.Build(server, "tiny", "http://127.0.0.1:0", template);
        await app.StartAsync();
        using var http = new HttpClient { BaseAddress = new Uri(app.Urls.First()) };
        var load = await http.PostAsJsonAsync("/v1/load_lora_adapter", new { lora_name = "ask", lora_path = folder });
        Assert.That(load.StatusCode, Is.EqualTo(HttpStatusCode.OK), await load.Content.ReadAsStringAsync());
        ChatClient Client(string name) => new(name, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = new Uri(http.BaseAddress, "/v1") });
        var options = new ChatCompletionOptions { MaxOutputTokenCount = 6, Temperature = 0 };
        ChatMessage[] conversation = { new UserChatMessage("A long conversation with the base model, then a question for the adapter") };
        string rendered = "<user>A long conversation with the base model, then a question for the adapter\n<ask>";
        string expected;
        using (var set = new VariantSet(model))
        {
            set.AddLora("ask", PeftLoraAdapter.Load(folder, model));
            expected = BatchGenerator.Generate(model, new[] { new GenerationRequest(rendered, "ask", MaxTokens: 6) { AddBos = false } }, set)[0].Completion;
        }

        var onBase = (await Client("tiny").CompleteChatAsync(conversation, options)).Value;
        Assert.That(onBase.Usage.InputTokenDetails.CachedTokenCount, Is.EqualTo(0));
        var asked = (await Client("ask").CompleteChatAsync(conversation, options)).Value;
        Assert.That(asked.Content[0].Text, Is.EqualTo(expected));
        Assert.That(asked.Usage.InputTokenCount, Is.EqualTo(model.Tokenizer.Encode(rendered).Length));
        Assert.That(asked.Usage.InputTokenDetails.CachedTokenCount, Is.GreaterThan(rendered.Length / 2), "the base's blocks of the conversation");

        var missing = await http.PostAsJsonAsync("/v1/completions", new { model = "ask", prompt = "no invocation here", max_tokens = 2 });
        Assert.That(missing.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        Assert.That(await missing.Content.ReadAsStringAsync(), Does.Contain("invocation tokens"));
        await app.StopAsync();
    }

    private static async Task<JsonNode> Post(HttpClient http, string path, object body)
    {
        var response = await http.PostAsJsonAsync(path, body);
        string text = await response.Content.ReadAsStringAsync();
        Assert.That(response.StatusCode, Is.EqualTo(HttpStatusCode.OK), text);
        return JsonNode.Parse(text)!;
    }
}
