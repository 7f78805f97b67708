using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;

namespace PeftSharp.Tests.Managed;

/// <summary>
/// generation_config.json's eos_token_id may list several ids (Llama 3.1 and 3.2 list three); generation stops at any
/// of them, as transformers' generate does, not only at the tokenizer's EOS.
/// </summary>
public sealed class StopTokenTests : TempDirectoryTest
{
    [Test]
    public void Generate_StopsAtAnyEosIdOfGenerationConfig()
    {
        using var device = new CpuDevice();
        // Weights of unit scale: a random model of normal(0, 0.02) weights repeats one token, this one wanders.
        using var model = LlamaModel.FromTensors(device, LlamaConfig.Tiny, (name, shape) => name.EndsWith("norm.weight", StringComparison.Ordinal)
            ? Enumerable.Repeat(1f, shape[0]).ToArray()
            : TestData.Uniform(shape.Aggregate(1, (a, b) => a * b), name.Length * 31 + shape[0], -0.5f, 0.5f));
        // The greedy continuation of "abc", token by token.
        var ids = new List<int>();
        using (var cache = new KvCache(model, 32))
        {
            var logits = model.DecodeStep(cache, ByteTokenizer.Instance.EncodeStart("abc").ToArray());
            for (int i = 0; i < 12; i++)
            {
                int next = Array.IndexOf(logits, logits.Max());
                ids.Add(next);
                logits = model.DecodeStep(cache, new[] { next });
            }
        }

        Assert.That(ids, Has.No.Member(ByteTokenizer.Eos), "the continuation runs the 12 tokens");
        // The first token that has not appeared before: with it as a stop id the output is cut right before it.
        int at = Enumerable.Range(1, ids.Count - 1).First(k => !ids.Take(k).Contains(ids[k]));
        int stop = ids[at];

        // The folder's generation_config.json lists it beside an id the model never produces; the loaded model stops there.
        string dir = Path.Combine(TempDir, "model");
        HuggingFaceFolder.Save(model, dir);
        File.WriteAllText(Path.Combine(dir, GenerationConfig.FileName), $$"""{"eos_token_id": [258, {{stop}}], "max_new_tokens": 12}""");
        using var loaded = HuggingFaceFolder.Load(dir, device);
        Assert.That(loaded.StopTokens, Is.EqualTo(new[] { 258, stop }));
        var cut = BatchGenerator.Generate(loaded, new[] { new GenerationRequest("abc", MaxTokens: 12), new GenerationRequest("xyz", MaxTokens: 12) });
        Assert.That(cut[0].Completion, Is.EqualTo(ByteTokenizer.Instance.Decode(ids.Take(at).ToList())));
        Assert.That(cut[0].Tokens, Is.EqualTo(at));
        Assert.That(Generator.Greedy(loaded, "abc", 12), Is.EqualTo(cut[0].Completion), "single prompts stop the same way");

        // One id (the older form) and a malformed entry.
        File.WriteAllText(Path.Combine(dir, GenerationConfig.FileName), $$"""{"eos_token_id": {{stop}}}""");
        Assert.That(GenerationConfig.Read(dir).EosTokenIds, Is.EqualTo(new[] { stop }));
        File.WriteAllText(Path.Combine(dir, GenerationConfig.FileName), """{"eos_token_id": [1, "two"]}""");
        var e = Assert.Throws<PeftSharpInputException>(() => GenerationConfig.Read(dir))!;
        Assert.That(e.Message, Does.Contain("eos_token_id").And.Contain(GenerationConfig.FileName));
    }
}
