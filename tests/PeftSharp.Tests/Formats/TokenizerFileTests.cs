using System.Text.Json;
using System.Text.Json.Nodes;
using NUnit.Framework;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;

namespace PeftSharp.Tests.Formats;

/// <summary>
/// Model folders' tokenizer files. The fixtures (Fixtures/Tokenizers, made by make_fixtures.py) hold SentencePiece
/// models trained by Google's sentencepiece and byte-level BPE tokenizer.json files, with the ids that reference
/// implementations gave for a set of texts: sentencepiece itself for the .model files, Hugging Face transformers.js
/// for the tokenizer.json files. Ids must match exactly; there is no tolerance in tokenization.
/// </summary>
public sealed class TokenizerFileTests : TempDirectoryTest
{
    private static string Fixtures => Path.Combine(TestContext.CurrentContext.TestDirectory, "Fixtures", "Tokenizers");

    private static List<(string Text, int[] Ids, string Decoded, int[]? WithSpecials)> Cases(string expectedFile, string key)
    {
        var doc = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures, expectedFile)))!;
        return doc[key]!.AsArray().Select(c => (
            c!["text"]!.GetValue<string>(),
            c["ids"]!.AsArray().Select(i => i!.GetValue<int>()).ToArray(),
            c["decoded"]!.GetValue<string>(),
            c["with_specials"]?.AsArray().Select(i => i!.GetValue<int>()).ToArray())).ToList();
    }

    /// <summary>A folder holding the fixture's tokenizer.json (+ tokenizer_config.json), or a .model as tokenizer.model.</summary>
    /// <summary>
    /// A Split pre-tokenizer's pattern comes from the file: one that backtracks exponentially ends the encode with an
    /// error naming the file and the pattern within the match timeout (it hung `peft tokenize`), and one .NET cannot
    /// compile is refused when the tokenizer is read.
    /// </summary>
    [Test]
    public void SplitPatternFromTheFile_TimesOutOrFailsToCompile_WithAnErrorNamingIt()
    {
        string dir = FolderWith("gpt2_style");
        string json = Path.Combine(dir, "tokenizer.json");
        var doc = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(json))!.AsObject();
        doc["pre_tokenizer"] = System.Text.Json.Nodes.JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated"}""");
        File.WriteAllText(json, doc.ToJsonString());
        var tok = HfTokenizer.Load(dir);
        Assert.That(tok.Encode("aab"), Is.Not.Empty, "short text is fine");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<PeftSharpInputException>(() => tok.Encode(new string('a', 40) + "b"))!;
        Assert.That(e.Message, Does.Contain("tokenizer.json").And.Contain("(a+)+$"));
        Assert.That(clock.Elapsed.TotalSeconds, Is.LessThan(30), "the timeout ends it, the backtracking does not");

        doc["pre_tokenizer"] = System.Text.Json.Nodes.JsonNode.Parse("""{"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}""");
        File.WriteAllText(json, doc.ToJsonString());
        var bad = Assert.Throws<PeftSharpInputException>(() => HfTokenizer.Load(dir))!;
        Assert.That(bad.Message, Does.Contain("tokenizer.json").And.Contain("(unclosed"));
    }

    private string FolderWith(string fixture)
    {
        string dir = Path.Combine(TempDir, Path.GetFileNameWithoutExtension(fixture));
        Directory.CreateDirectory(dir);
        string src = Path.Combine(Fixtures, fixture);
        if (Directory.Exists(src))
        {
            foreach (var f in Directory.GetFiles(src)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        }
        else
        {
            File.Copy(src, Path.Combine(dir, HfTokenizer.SentencePieceFile));
        }

        return dir;
    }

    [TestCase("gpt2_style", TestName = "TokenizerJson_Gpt2StyleByteLevel_MatchesTransformersJs")]
    [TestCase("llama3_style", TestName = "TokenizerJson_Llama3StyleSplitIgnoreMerges_MatchesTransformersJs")]
    [TestCase("added_tokens", TestName = "TokenizerJson_AddedTokensWithLstripRstrip_MatchesTransformersJs")]
    // Normalizers (Qwen's NFC; NFKC then Lowercase) on decomposed accents, Hangul jamo, Vietnamese, ligatures, fullwidth
    // and the angstrom sign: real normalization in this invariant-globalization process (expected_json.mjs unicode).
    [TestCase("nfc_style", "expected_unicode.json", TestName = "TokenizerJson_NfcNormalizer_MatchesTransformersJs")]
    [TestCase("nfkc_style", "expected_unicode.json", TestName = "TokenizerJson_NfkcLowercaseNormalizers_MatchesTransformersJs")]
    // SentencePiece-style BPE in tokenizer.json only (Llama 2's legacy normalizer; Metaspace with prepend_scheme first):
    // byte fallback for accents, CJK and emoji, whitespace runs, code (make_spm_json.py, expected_json.mjs spm_json).
    [TestCase("spm_json_legacy", "expected_spm_json.json", TestName = "TokenizerJson_SentencePieceStyleLegacy_MatchesTransformersJs")]
    [TestCase("spm_json_metaspace", "expected_spm_json.json", TestName = "TokenizerJson_SentencePieceStyleMetaspace_MatchesTransformersJs")]
    public void TokenizerJson_MatchesReference(string fixture, string expected = "expected_json.json")
    {
        var tok = HfTokenizer.Load(FolderWith(fixture));
        foreach (var (text, ids, decoded, withSpecials) in Cases(expected, fixture))
        {
            var got = tok.Encode(text);
            Assert.That(got, Is.EqualTo(ids), $"Encode({JsonSerializer.Serialize(text)})");
            Assert.That(tok.Decode(got), Is.EqualTo(decoded), $"Decode of {JsonSerializer.Serialize(text)}");
            Assert.That(tok.EncodeStart(text), Is.EqualTo(withSpecials), $"[BOS] + Encode({JsonSerializer.Serialize(text)})");
        }
    }

    [TestCase("spm_bpe.model", TestName = "TokenizerModel_SentencePieceBpe_MatchesSentencePiece")]
    [TestCase("spm_unigram.model", TestName = "TokenizerModel_SentencePieceUnigram_MatchesSentencePiece")]
    public void SentencePiece_MatchesReference(string fixture)
    {
        var tok = HfTokenizer.Load(FolderWith(fixture));
        foreach (var (text, ids, decoded, _) in Cases("expected_spm.json", fixture))
        {
            var got = tok.Encode(text);
            Assert.That(got, Is.EqualTo(ids), $"Encode({JsonSerializer.Serialize(text)})");
            // sentencepiece writes an unknown piece (id 0) as " ⁇ "; the decoder here leaves it out, like skip_special_tokens.
            if (!ids.Contains(0)) Assert.That(tok.Decode(got), Is.EqualTo(decoded), $"Decode of {JsonSerializer.Serialize(text)}");
        }

        Assert.That(Cases("expected_spm.json", fixture).Any(c => c.Ids.Contains(0)), Is.EqualTo(fixture == "spm_unigram.model"),
            "the Unigram fixture has unknown characters, the BPE one falls back to bytes");

        // The trainer's ids: unk 0, bos 1, eos 2 (make_fixtures.py); Llama-style folders add BOS by default.
        Assert.That((tok.Bos, tok.Eos), Is.EqualTo(((int?)1, (int?)2)));
        Assert.That(tok.VocabSize, Is.EqualTo(fixture == "spm_bpe.model" ? 400 : 120));
    }

    [Test]
    public void SpecialTokens_ComeFromTokenizerConfigOrTemplate()
    {
        // gpt2_style: tokenizer_config says add_bos_token false, pad <|pad|>; 406 vocabulary entries, then the specials.
        var gpt2 = HfTokenizer.Load(FolderWith("gpt2_style"));
        Assert.That((gpt2.Bos, gpt2.Eos, gpt2.Pad, gpt2.VocabSize), Is.EqualTo(((int?)null, (int?)407, 408, 409)));
        // llama3_style: no add_bos_token, so the post-processor's template decides; no pad_token, so EOS pads.
        var llama3 = HfTokenizer.Load(FolderWith("llama3_style"));
        Assert.That((llama3.Bos, llama3.Eos, llama3.Pad, llama3.VocabSize), Is.EqualTo(((int?)407, (int?)408, 408, 410)));
        // tokenizer_config.json may turn BOS off for a SentencePiece folder too.
        string dir = FolderWith("spm_bpe.model");
        File.WriteAllText(Path.Combine(dir, HfTokenizer.ConfigFile), "{\"add_bos_token\": false, \"eos_token\": {\"content\": \"</s>\"}}");
        var sp = HfTokenizer.Load(dir);
        Assert.That((sp.Bos, sp.Eos), Is.EqualTo(((int?)null, (int?)2)));
    }

    [Test]
    public void Unsupported_TokenizerJson_IsAClearError()
    {
        string dir = FolderWith("gpt2_style");
        string path = Path.Combine(dir, HfTokenizer.JsonFile);
        var doc = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        // GPT-2's own file writes "" for the subword prefix and suffix: none. A real prefix is refused.
        doc["model"]!["continuing_subword_prefix"] = "";
        doc["model"]!["end_of_word_suffix"] = "";
        File.WriteAllText(path, doc.ToJsonString());
        Assert.That(HfTokenizer.Load(dir).Encode("the quick brown fox"), Is.EqualTo(Cases("expected_json.json", "gpt2_style").Single(c => c.Text == "the quick brown fox").Ids));
        doc["model"]!["continuing_subword_prefix"] = "##";
        File.WriteAllText(path, doc.ToJsonString());
        Assert.That(Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(dir))!.Message, Does.Contain("continuing_subword_prefix"));
        doc["model"]!["continuing_subword_prefix"] = null;
        doc["model"]!["type"] = "WordPiece";
        File.WriteAllText(path, doc.ToJsonString());
        var e = Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(dir))!;
        Assert.That(e.Message, Does.Contain(path).And.Contain("WordPiece"));

        doc["model"]!["type"] = "BPE";
        doc["pre_tokenizer"] = JsonNode.Parse("{\"type\": \"Whitespace\"}");
        File.WriteAllText(path, doc.ToJsonString());
        e = Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(dir))!;
        Assert.That(e.Message, Does.Contain("Whitespace"));

        // A SentencePiece-style BPE tokenizer.json (no ByteLevel) is read on its own, with a pre-tokenizer it knows;
        // beside a tokenizer.model, the folder's tokenizer.model is read.
        doc["pre_tokenizer"] = JsonNode.Parse("{\"type\": \"Metaspace\", \"replacement\": \"\u2581\"}");
        doc["decoder"] = null;
        File.WriteAllText(path, doc.ToJsonString());
        Assert.That(HfTokenizer.Load(dir).Name, Does.Contain("SentencePiece-style BPE"));
        doc["pre_tokenizer"] = JsonNode.Parse("{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Metaspace\"}, {\"type\": \"Digits\"}]}");
        File.WriteAllText(path, doc.ToJsonString());
        Assert.That(Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(dir))!.Message, Does.Contain("pre_tokenizer").And.Contain("Digits"));
        File.Copy(Path.Combine(Fixtures, "spm_bpe.model"), Path.Combine(dir, HfTokenizer.SentencePieceFile));
        File.Delete(Path.Combine(dir, HfTokenizer.ConfigFile));
        Assert.That(HfTokenizer.Load(dir).Name, Does.Contain("SentencePiece"));

        File.WriteAllText(path, "{\"model\": ");
        Assert.That(Assert.Throws<PeftSharpInputException>(() => HfTokenizer.Load(dir))!.Message, Does.Contain(path));
        File.Delete(path);
        File.WriteAllBytes(Path.Combine(dir, HfTokenizer.SentencePieceFile), new byte[] { 0x0a, 0xff, 0xff, 0x01 });
        Assert.That(Assert.Throws<PeftSharpInputException>(() => HfTokenizer.Load(dir))!.Message, Does.Contain(HfTokenizer.SentencePieceFile));
    }

    /// <summary>
    /// SentencePiece models whose ids Microsoft.ML.Tokenizers would get wrong are refused by name: a precompiled
    /// normalization map (nmt_nfkc), and Unigram with byte fallback. The fixtures are edited by appending a protobuf
    /// field, which protobuf merges over the earlier one.
    /// </summary>
    [Test]
    public void SentencePiece_TheLibraryWouldGetWrong_IsRefused()
    {
        string bpe = FolderWith("spm_bpe.model");
        string path = Path.Combine(bpe, HfTokenizer.SentencePieceFile);
        var name = System.Text.Encoding.ASCII.GetBytes("nmt_nfkc");
        var normalizer = new byte[] { 0x0a, (byte)name.Length }.Concat(name).Concat(new byte[] { 0x12, 3, 1, 2, 3 }).ToArray();
        File.WriteAllBytes(path, File.ReadAllBytes(path).Concat(new byte[] { 0x1a, (byte)normalizer.Length }).Concat(normalizer).ToArray());
        Assert.That(Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(bpe))!.Message, Does.Contain("nmt_nfkc").And.Contain(path));

        string unigram = FolderWith("spm_unigram.model");
        path = Path.Combine(unigram, HfTokenizer.SentencePieceFile);
        Assert.DoesNotThrow(() => HfTokenizer.Load(unigram));
        File.WriteAllBytes(path, File.ReadAllBytes(path).Concat(new byte[] { 0x12, 3, 0x98, 0x02, 0x01 }).ToArray()); // trainer_spec.byte_fallback = true
        Assert.That(Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(unigram))!.Message, Does.Contain("Unigram").And.Contain("byte fallback"));
    }

    /// <summary>A tiny model folder whose vocabulary is the tokenizer's: it loads with the tokenizer, trains, generates and saves it along.</summary>
    [Test]
    public void ModelFolder_WithTokenizerJson_TrainsGeneratesAndSavesTheTokenizer()
    {
        using var device = new CpuDevice();
        string dir = FolderWith("llama3_style");
        var config = LlamaConfig.Tiny with { VocabSize = 416 };
        using (var fresh = LlamaModel.Create(device, config, seed: 3)) HuggingFaceFolder.Save(fresh, dir);
        using var model = HuggingFaceFolder.Load(dir, device);
        Assert.That(model.HasTokenizer);
        Assert.That(model.Tokenizer.Name, Does.Contain("tokenizer.json"));

        var examples = Enumerable.Range(0, 8).Select(i => new Example("t", $"copy {i}: ", $"the quick {i}")).ToList();
        var (ids, targets) = Batcher.Encode(examples, model.Tokenizer, seqLen: 24, completionOnly: true);
        Assert.That(ids[0], Is.EqualTo(407), "rows start with the template's BOS");
        var completion = model.Tokenizer.EncodeEnd("the quick 0");
        Assert.That(targets.Take(24).Where(t => t != Batcher.IgnoreIndex), Is.EqualTo(completion), "completion-only targets are the completion and EOS");

        using var optimizer = new AdamW(model.AllParameters.ToList(), weightDecay: 0f);
        double first = 0, last = 0;
        for (int step = 0; step < 30; step++)
        {
            model.ZeroGrad();
            var (loss, _) = model.Loss(ids, targets, examples.Count, backward: true);
            optimizer.Step(3e-3f);
            if (step == 0) first = loss;
            last = loss;
        }

        Assert.That(last, Is.LessThan(first * 0.7), "training on ids from tokenizer.json lowers the loss");
        string text = Generator.Greedy(model, "copy 3: ", maxTokens: 6);
        Assert.That(model.Tokenizer.Encode(text).Length, Is.LessThanOrEqualTo(6));
        var batch = BatchGenerator.Generate(model, new[] { new GenerationRequest("copy 3: ", MaxTokens: 6) });
        Assert.That(batch[0].Completion, Is.EqualTo(text), "batched generation decodes with the same tokenizer");

        string saved = Path.Combine(TempDir, "saved");
        HuggingFaceFolder.Save(model, saved);
        Assert.That(File.ReadAllBytes(Path.Combine(saved, HfTokenizer.JsonFile)), Is.EqualTo(File.ReadAllBytes(Path.Combine(dir, HfTokenizer.JsonFile))));
        using var reloaded = HuggingFaceFolder.Load(saved, device);
        Assert.That(reloaded.Tokenizer.Encode("the quickbrown fox"), Is.EqualTo(model.Tokenizer.Encode("the quickbrown fox")));
    }

    /// <summary>The host's text commands on a folder with a tokenizer.json: fine-tune, evaluate, generate; the output folder carries the tokenizer.</summary>
    [Test]
    public void Host_TextCommands_UseTheFoldersTokenizer()
    {
        using (var device = new CpuDevice())
        using (var fresh = LlamaModel.Create(device, LlamaConfig.Tiny with { VocabSize = 416 }, seed: 5))
        {
            HuggingFaceFolder.Save(fresh, FolderWith("gpt2_style"));
        }

        string model = Path.Combine(TempDir, "gpt2_style");
        string data = Path.Combine(TempDir, "data.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 12).Select(i => JsonSerializer.Serialize(new { prompt = $"copy {i}: ", completion = $"the fox {i}" })));
        string outDir = Path.Combine(TempDir, "out");
        var r = Host.Peft.Run("finetune", "--model", model, "--data", data, "--method", "full", "--steps", "3", "--batch-size", "4", "--seq-len", "24", "--out", outDir, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(File.ReadAllBytes(Path.Combine(outDir, HfTokenizer.JsonFile)), Is.EqualTo(File.ReadAllBytes(Path.Combine(model, HfTokenizer.JsonFile))));
        r = Host.Peft.Run("eval", "--model", outDir, "--data", data, "--seq-len", "24", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(r.Out, Does.Contain("loss"));
        r = Host.Peft.Run("generate", "--model", outDir, "--prompt", "copy 1: ", "--max-tokens", "3", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);

        // peft tokenize prints what the fixture's reference gave.
        var expected = Cases("expected_json.json", "gpt2_style").Single(c => c.Text == "the quickbrown fox").Ids;
        r = Host.Peft.Run("tokenize", "--model", outDir, "--text", "the quickbrown fox");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(JsonNode.Parse(r.Out)!["ids"]!.AsArray().Select(i => i!.GetValue<int>()), Is.EqualTo(expected));
        r = Host.Peft.Run("tokenize", "--model", outDir, "--decode", string.Join(",", expected));
        Assert.That(JsonNode.Parse(r.Out)!["text"]!.GetValue<string>(), Is.EqualTo("the quickbrown fox"));

        // Without the tokenizer files the same folder is refused for text, by name.
        File.Delete(Path.Combine(outDir, HfTokenizer.JsonFile));
        r = Host.Peft.Run("generate", "--model", outDir, "--prompt", "copy 1: ", "--device", "cpu");
        Assert.That(r.Code, Is.Not.EqualTo(0));
        Assert.That(r.Err, Does.Contain("vocab_size 416").And.Contain("tokenizer.json"));
    }

    /// <summary>peft pretrain --tokenizer: a new model sized to the tokenizer's vocabulary, trained on its ids, saved with its files.</summary>
    [Test]
    public void Host_PretrainWithATokenizerFolder()
    {
        string tokenizer = FolderWith("llama3_style");
        string outDir = Path.Combine(TempDir, "pre");
        var r = Host.Peft.Run("pretrain", "--data", "builtin:tasks", "--config", "tiny", "--tokenizer", tokenizer, "--steps", "3", "--batch-size", "4", "--out", outDir, "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        Assert.That(HuggingFaceFolder.ReadConfig(outDir).VocabSize, Is.EqualTo(410), "tiny takes the tokenizer's vocabulary size");
        Assert.That(File.ReadAllBytes(Path.Combine(outDir, HfTokenizer.JsonFile)), Is.EqualTo(File.ReadAllBytes(Path.Combine(tokenizer, HfTokenizer.JsonFile))));
        r = Host.Peft.Run("generate", "--model", outDir, "--prompt", "the quick", "--max-tokens", "2", "--device", "cpu");
        Assert.That(r.Code, Is.EqualTo(0), r.Err);
        r = Host.Peft.Run("pretrain", "--data", "builtin:tasks", "--tokenizer", TempDir, "--steps", "1", "--out", Path.Combine(TempDir, "x"), "--quiet", "--device", "cpu");
        Assert.That(r.Code, Is.Not.EqualTo(0));
        Assert.That(r.Err, Does.Contain("--tokenizer"));
    }

    [Test]
    public void ModelFolder_TokenizerLargerThanVocab_IsAnError()
    {
        using var device = new CpuDevice();
        string dir = FolderWith("llama3_style");
        using (var fresh = LlamaModel.Create(device, LlamaConfig.Tiny with { VocabSize = 300 }, seed: 3)) HuggingFaceFolder.Save(fresh, dir);
        using var model = HuggingFaceFolder.Load(dir, device);
        var e = Assert.Throws<PeftSharpInputException>(() => _ = model.Tokenizer)!;
        Assert.That(e.Message, Does.Contain("vocab_size is 300").And.Contain("409"));
    }

    [Test]
    public void Model_WithoutTokenizer_AndForeignVocab_IsAnError()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, LlamaConfig.Tiny with { VocabSize = 300 }, seed: 3);
        Assert.That(model.HasTokenizer, Is.False);
        Assert.That(Assert.Throws<InvalidOperationException>(() => _ = model.Tokenizer)!.Message, Does.Contain("vocab_size 300"));
        using var bytes = LlamaModel.Create(device, LlamaConfig.Tiny, seed: 3);
        Assert.That(bytes.Tokenizer, Is.SameAs(ByteTokenizer.Instance));
    }
}
