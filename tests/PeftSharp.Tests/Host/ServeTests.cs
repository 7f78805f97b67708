using System.ClientModel;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json.Nodes;
using NUnit.Framework;
using OpenAI;
using OpenAI.Models;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Tests.Managed;
using PeftSharp.Trainer.Commands;

namespace PeftSharp.Tests.Host;

/// <summary>`peft serve`'s endpoints over loopback HTTP: completions (plain and streamed), models, adapters loaded and unloaded live, metrics.</summary>
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

        var unknown = await http.PostAsJsonAsync("/v1/completions", new { model = "nope", prompt = "x" });
        Assert.That(unknown.StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
        Assert.That(JsonNode.Parse(await unknown.Content.ReadAsStringAsync())!["error"]!["message"]!.GetValue<string>(), Does.Contain("nope"));
        var bad = await http.PostAsJsonAsync("/v1/completions", new { model = "tiny", prompt = 5 });
        Assert.That(bad.StatusCode, Is.EqualTo(HttpStatusCode.BadRequest));
        Assert.That((await http.PostAsJsonAsync("/v1/chat/completions", new { model = "tiny" })).StatusCode, Is.EqualTo(HttpStatusCode.NotImplemented));
        Assert.That((await http.PostAsJsonAsync("/v1/unload_lora_adapter", new { lora_name = "ad" })).StatusCode, Is.EqualTo(HttpStatusCode.OK));
        Assert.That((await http.PostAsJsonAsync("/v1/completions", new { model = "ad", prompt = "x" })).StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
        Assert.That((await http.PostAsJsonAsync("/v1/unload_lora_adapter", new { lora_name = "ad" })).StatusCode, Is.EqualTo(HttpStatusCode.NotFound));
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
