using System.Buffers.Binary;
using System.Text;
using System.Text.RegularExpressions;
using NUnit.Framework;
using PeftSharp.Compression;
using PeftSharp.Data;
using PeftSharp.Engine.Cpu;
using PeftSharp.Formats;
using PeftSharp.Merging;
using PeftSharp.Model;
using PeftSharp.Serving;
using PeftSharp.Tests.Infrastructure;
using PeftSharp.Training;
using PeftSharp.Variants;

namespace PeftSharp.Tests.Formats;

/// <summary>
/// Seeded mutations of every kind of file PeftSharp reads (truncations, deleted and inserted bytes, numbers and strings
/// replaced by hostile values, duplicated keys, invalid UTF-8, a safetensors header length that lies). Every outcome
/// must be a clean load or the documented refusal: <see cref="PeftSharpInputException"/> naming the file's folder, or
/// <see cref="NotSupportedException"/> for a well-formed feature PeftSharp does not implement. Anything else (a
/// KeyNotFoundException, an OverflowException, a stack trace in the host) or a load slower than
/// <see cref="HangLimit"/> fails the test with the mutation that caused it.
/// </summary>
public sealed class FuzzTests : TempDirectoryTest
{
    /// <summary>Mutations per kind of file: a few hundred keeps the whole fixture under ten seconds.</summary>
    private const int Mutations = 250;

    /// <summary>A load this slow is a hang (the largest fixture loads in milliseconds).</summary>
    private static readonly TimeSpan HangLimit = TimeSpan.FromSeconds(20);

    private static readonly LlamaConfig Config = LlamaConfig.Tiny with { NumHiddenLayers = 1, HiddenSize = 32, IntermediateSize = 48, NumAttentionHeads = 2, NumKeyValueHeads = 1 };

    /// <summary>Values that break parsers that trust their input: wrong types, overflow, non-finite, lone surrogates.</summary>
    private static readonly string[] Hostile =
    {
        "\"64\"", "null", "-1", "0", "1e309", "-1e309", "4611686018427387904", "-9223372036854775808", "9223372036854775807", "NaN",
        "true", "[]", "{}", "2147483648", "0.5", "[4611686018427387904, 4]", "\"\\ud800\"", "[null]", "1e-320", "\"\"", "[[1]]",
        ".nan", ".inf", "{a: 1}", "[x, y]", "~",
    };

    private static readonly string[] Junk = { "\"", "{", "}", "[", "]", ",", ":", "0", "-", "e", "\\", "\n", "\u00ff", "\ud83d\ude00", "? [a, b]\n: 1\n", "&a ", "*a", "!!binary " };

    [TestCase("model")]
    [TestCase("sharded")]
    [TestCase("tokenizer")]
    [TestCase("lora")]
    [TestCase("prefix")]
    [TestCase("bitdelta")]
    [TestCase("sparse")]
    [TestCase("merge")]
    [TestCase("data")]
    [TestCase("requests")]
    [TestCase("checkpoint")]
    public void MutatedFiles_LoadCleanly_OrAreRefusedWithTheDocumentedException(string kind)
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, Config, seed: 1);
        var (folder, load) = Fixture(kind, device, model);
        var files = Directory.GetFiles(folder, "*", SearchOption.AllDirectories).Where(f => !f.EndsWith(".tmp", StringComparison.Ordinal)).OrderBy(f => f, StringComparer.Ordinal).ToArray();
        var pristine = files.ToDictionary(f => f, File.ReadAllBytes);
        load(); // the fixture itself loads

        var failures = new List<string>();
        int refused = 0;
        for (int i = 0; i < Mutations; i++)
        {
            var random = new Random(1000 * kind.Length + i);
            string file = files[random.Next(files.Length)];
            var (bytes, op) = Mutate(pristine[file], file, random);
            File.WriteAllBytes(file, bytes);
            try
            {
                var task = Task.Run(load);
                if (!task.Wait(HangLimit)) failures.Add($"{Path.GetFileName(file)} #{i} ({op}): no answer in {HangLimit.TotalSeconds} s");
            }
            catch (AggregateException a) when (a.InnerExceptions.Count == 1)
            {
                var e = a.InnerExceptions[0];
                if (e is PeftSharpInputException && e.Message.Contains(folder, StringComparison.Ordinal) || e is NotSupportedException)
                {
                    refused++;
                    if (Environment.GetEnvironmentVariable("FUZZ_SHOW") != null) TestContext.Out.WriteLine($"{kind} {op}: {e.GetType().Name}: {e.Message[..Math.Min(220, e.Message.Length)]}");
                }
                else
                {
                    failures.Add($"{Path.GetFileName(file)} #{i} ({op}): {e.GetType().Name}: {e.Message}");
                }
            }
            finally
            {
                File.WriteAllBytes(file, pristine[file]);
            }
        }

        Assert.That(failures, Is.Empty, $"{failures.Count} of {Mutations} mutations escaped ({refused} refused cleanly):\n" + string.Join("\n", failures.Take(12)));
        Assert.That(refused, Is.GreaterThan(Mutations / 4), "the mutations must reach the parsers' checks, not only bytes nobody reads");
    }

    /// <summary>A safetensors file with one tensor of <paramref name="shape"/> whose span is <paramref name="spanBytes"/> long, written byte by byte.</summary>
    private static void WriteRawSafetensors(string path, string shape, int spanBytes, string? extraEntry = null)
    {
        string header = $"{{\"w\": {{\"dtype\": \"F32\", \"shape\": {shape}, \"data_offsets\": [0, {spanBytes}]}}{extraEntry}}}";
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + spanBytes];
        BinaryPrimitives.WriteInt64LittleEndian(bytes, h.Length);
        h.CopyTo(bytes, 8);
        File.WriteAllBytes(path, bytes);
    }

    [TestCase("[4611686018427387904, 4]", 16, "more elements than a 64-bit count holds", TestName = "SafeTensors_ShapeWhoseElementCountOverflows_IsRefused")]
    [TestCase("[4611686018427387904]", 0, "more elements than a 64-bit count holds", TestName = "SafeTensors_ShapeWhoseByteCountWrapsToAnEmptySpan_IsRefused")]
    [TestCase("[2, 2]", 16, "names 'w' twice", TestName = "SafeTensors_DuplicateTensorName_IsRefused")]
    public void HostileSafetensors_AreRefusedNamingTheFileAndTheOffset(string shape, int span, string expected)
    {
        string path = Path.Combine(TempDir, "x.safetensors");
        WriteRawSafetensors(path, shape, span, expected.Contains("twice") ? ", \"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}" : null);
        var e = Assert.Throws<PeftSharpInputException>(() => SafeTensorsFile.Open(path).Dispose())!;
        Assert.That(e.Message, Does.StartWith(path + ": at byte ").And.Contain(expected));
    }

    [Test]
    public void Config_ValueOfTheWrongType_NamesTheFileAndTheKey()
    {
        string json = LlamaConfig.Tiny.ToJson().Replace("\"hidden_size\": 64", "\"hidden_size\": \"64\"", StringComparison.Ordinal);
        Assert.That(json, Does.Contain("\"64\""), "the fixture replaced the value");
        var e = Assert.Throws<PeftSharpInputException>(() => LlamaConfig.Parse(json, "m/config.json"))!;
        Assert.That(e.Message, Is.EqualTo("m/config.json: $.hidden_size is the string \"64\", expected an integer in range"));
    }

    [Test]
    public void ShardIndex_ThatOmitsATensor_NamesTheTensorAndTheIndex()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, Config, seed: 1);
        HuggingFaceFolder.Save(model, TempDir, maxShardBytes: 8_000);
        string index = Path.Combine(TempDir, HuggingFaceFolder.IndexFile);
        var root = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(index))!;
        root["weight_map"]!.AsObject().Remove("model.norm.weight");
        File.WriteAllText(index, root.ToJsonString());
        var e = Assert.Throws<PeftSharpInputException>(() => HuggingFaceFolder.Load(TempDir, device).Dispose())!;
        Assert.That(e.Message, Does.Contain("missing model.norm.weight [32] (not in model.safetensors.index.json)"));
    }

    [Test]
    public void Checkpoint_WithAnImpossibleDataPosition_IsRefusedAtOnce()
    {
        using var device = new CpuDevice();
        using var model = LlamaModel.Create(device, Config, seed: 1);
        var options = new TrainOptions { Steps = 2, BatchSize = 2, SeqLen = 32, CheckpointEvery = 2, Seed = 5 };
        using var optimizer = new AdamW(model.AllParameters);
        var run = new TrainingRun(model, optimizer, new LearningRateSchedule.Constant(1e-3f), ExampleSource.Tasks(TaskSuite.Tasks, 5, Split.Train), options);
        run.Run(TempDir);
        string state = Path.Combine(TempDir, "checkpoint", "trainer_state.json");
        File.WriteAllText(state, File.ReadAllText(state).Replace("\"data_position\": 4", "\"data_position\": 1099511627776", StringComparison.Ordinal));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<PeftSharpInputException>(() => run.Resume(Path.Combine(TempDir, "checkpoint")))!;
        Assert.That(e.Message, Does.Contain("data_position 1099511627776 is more than step 2 x 2 examples per step could have read"));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)), "refused, not replayed example by example");
    }

    [Test]
    public void ExampleSource_SeekOnAFiniteSource_ReplaysOnlyOnePass()
    {
        var examples = Enumerable.Range(0, 5).Select(i => new Example("t", $"p{i}", $"c{i}")).ToList();
        var a = ExampleSource.List(examples);
        a.Seek(1L << 40); // 2^40 mod 5 = 1: instant
        var b = ExampleSource.List(examples);
        b.Next(1);
        Assert.That((a.Position, a.Next(3).Select(e => e.Prompt)), Is.EqualTo((1L << 40, b.Next(3).Select(e => e.Prompt))));
    }

    [TestCase("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n", "models[0].parameters.weight '.nan' is not a finite number")]
    [TestCase("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1e400}\n", "models[0].parameters.weight '1e400' is not a finite number")]
    [TestCase("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: NaN}\n", "models[0].parameters.weight 'NaN' is not a finite number")]
    [TestCase("merge_method: linear\n? [a, b]\n: 1\nmodels:\n  - model: a\n", "the top level: a key at line 2 is not a plain name")]
    public void MergeConfig_NonFiniteNumbersAndNonScalarKeys_AreRefused(string yaml, string expected)
    {
        var e = Assert.Throws<PeftSharpInputException>(() => MergeConfig.Parse(yaml, "m.yaml"))!;
        Assert.That(e.Message, Does.StartWith("m.yaml: ").And.Contain(expected));
    }

    [Test]
    public void Host_CorruptFile_IsOneLineAndExitCode2_ABugIsExitCode1WithItsTrace()
    {
        using (var device = new CpuDevice())
        using (var model = LlamaModel.Create(device, Config, seed: 1))
        {
            HuggingFaceFolder.Save(model, TempDir);
        }

        string weights = Path.Combine(TempDir, HuggingFaceFolder.SingleFile);
        File.WriteAllBytes(weights, File.ReadAllBytes(weights)[..100]);
        var (code, _, err) = PeftSharp.Tests.Host.Peft.Run("logits", "--model", TempDir, "--tokens", "1,2");
        Assert.That(code, Is.EqualTo(PeftSharp.Trainer.Program.BadInput));
        Assert.That(err.TrimEnd().Split('\n'), Has.Length.EqualTo(1), err);
        Assert.That(err, Does.StartWith($"peft: {weights}: at byte 0: header length").And.Not.Contain("   at "));

        var bug = new StringWriter();
        Assert.That(PeftSharp.Trainer.Program.Report(new NullReferenceException("boom"), bug), Is.EqualTo(PeftSharp.Trainer.Program.InternalError));
        Assert.That(bug.ToString(), Does.StartWith("peft: internal error").And.Contain("NullReferenceException: boom"));
        Assert.That(PeftSharp.Trainer.Program.Report(new AggregateException(new IOException("No space left on device")), bug), Is.EqualTo(PeftSharp.Trainer.Program.BadInput),
            "a disk fault inside parallel work is still the user's to fix");
    }

    /// <summary>A pristine folder of <paramref name="kind"/> and the call that reads it as a user's command would.</summary>
    private (string Folder, Action Load) Fixture(string kind, CpuDevice device, LlamaModel model)
    {
        string dir = Path.Combine(TempDir, kind);
        Directory.CreateDirectory(dir);
        switch (kind)
        {
            case "model":
                HuggingFaceFolder.Save(model, dir);
                File.WriteAllText(Path.Combine(dir, GenerationConfig.FileName), """{"do_sample": true, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 8, "eos_token_id": [1, 2]}""");
                return (dir, () => HuggingFaceFolder.Load(dir, device).Dispose());
            case "sharded":
                HuggingFaceFolder.Save(model, dir, maxShardBytes: 8_000);
                return (dir, () => HuggingFaceFolder.Load(dir, device).Dispose());
            case "tokenizer":
                foreach (var f in Directory.GetFiles(Path.Combine(TestContext.CurrentContext.TestDirectory, "Fixtures", "Tokenizers", "llama3_style")))
                {
                    File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
                }

                return (dir, () =>
                {
                    var t = HfTokenizer.Load(dir);
                    _ = t.Decode(t.Encode("Hello wörld, 123 \u00e9\u0301 한국어"));
                });
            case "lora":
                var lora = new LoraAdapterConfig { R = 2, LoraAlpha = 4, TargetModules = new[] { "q_proj", "down_proj" } };
                model.AddLora(lora, seed: 2);
                model.ExportLora(lora).Save(dir, Config);
                model.RemoveLora();
                return (dir, () => VariantFolder.Load(dir, model));
            case "prefix":
                File.WriteAllText(Path.Combine(dir, PeftLoraAdapter.ConfigFile), """{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "prefix_projection": false, "task_type": "CAUSAL_LM"}""");
                SafeTensorsWriter.Write(Path.Combine(dir, PeftLoraAdapter.WeightsFile), new[]
                {
                    new SafeTensorData("prompt_embeddings", TestData.Uniform(2 * 2 * Config.NumHiddenLayers * Config.NumKeyValueHeads * Config.HeadDim, 3),
                        new[] { 2, 2 * Config.NumHiddenLayers * Config.NumKeyValueHeads * Config.HeadDim }),
                });
                return (dir, () => VariantFolder.Load(dir, model));
            case "bitdelta":
            case "sparse":
            {
                using var fine = LlamaModel.Create(device, Config, seed: 1);
                var w = fine["model.layers.0.mlp.up_proj.weight"].Value;
                w.CopyFrom(w.ToArray().Select((v, j) => j % 7 == 0 ? v + 0.01f : v).ToArray());
                if (kind == "bitdelta") BitDelta.Compress(model, fine).Save(dir, Config);
                else SparseDelta.Between(model, fine).Save(dir, Config);
                return (dir, () => VariantFolder.Load(dir, model));
            }

            case "merge":
                File.WriteAllText(Path.Combine(dir, "merge.yaml"), """
                    merge_method: dare_ties
                    base_model: base
                    models:
                      - model: a
                        parameters: {weight: 0.7, density: 0.4}
                      - model: b
                        parameters:
                          weight: 0.3
                          density: 0.9
                    parameters:
                      normalize: true
                      int8_mask: true
                      lambda: 1.0
                    dtype: bfloat16
                    """);
                return (dir, () => MergeConfig.Load(Path.Combine(dir, "merge.yaml")));
            case "data":
                File.WriteAllText(Path.Combine(dir, "train.jsonl"), """
                    {"prompt": "2+2=", "completion": "4"}
                    {"prompt": "caf\u00e9", "completion": " ok", "extra": [1, 2]}

                    {"prompt": "a", "completion": "b"}
                    """);
                return (dir, () =>
                {
                    foreach (var e in DataFiles.ReadJsonl(Path.Combine(dir, "train.jsonl"))) _ = new ByteTokenizer().Encode(e.Prompt + e.Completion);
                });
            case "requests":
                File.WriteAllText(Path.Combine(dir, "requests.jsonl"), """
                    {"prompt": "hello", "variant": "a", "max_tokens": 4, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "seed": 7}
                    {"prompt": "bye"}
                    """);
                return (dir, () => RequestFile.Read(Path.Combine(dir, "requests.jsonl"), new GenerationRequest("")));
            case "checkpoint":
            {
                var options = new TrainOptions { Steps = 2, BatchSize = 2, SeqLen = 32, CheckpointEvery = 2, Seed = 5 };
                using var optimizer = new AdamW(model.AllParameters);
                var run = new TrainingRun(model, optimizer, new LearningRateSchedule.Constant(1e-3f), ExampleSource.Tasks(TaskSuite.Tasks, 5, Split.Train), options);
                run.Run(dir);
                string ckpt = Path.Combine(dir, "checkpoint");
                return (ckpt, () =>
                {
                    using var resumedModel = HuggingFaceFolder.Load(ckpt, device);
                    using var resumedOptimizer = new AdamW(resumedModel.AllParameters);
                    new TrainingRun(resumedModel, resumedOptimizer, new LearningRateSchedule.Constant(1e-3f), ExampleSource.Tasks(TaskSuite.Tasks, 5, Split.Train), options).Resume(ckpt);
                });
            }

            default:
                throw new ArgumentException(kind);
        }
    }

    /// <summary>One seeded mutation of a file's bytes and its description. safetensors headers are mutated as JSON with a corrected length.</summary>
    private static (byte[] Bytes, string Op) Mutate(byte[] original, string file, Random random)
    {
        if (file.EndsWith(".safetensors", StringComparison.Ordinal) && original.Length >= 8 && random.Next(3) > 0)
        {
            long n = BinaryPrimitives.ReadInt64LittleEndian(original);
            if (random.Next(6) == 0)
            {
                long[] lies = { 0, 1, 7, n + 1, n - 1, original.Length, long.MaxValue, -1 };
                long lie = lies[random.Next(lies.Length)];
                var lied = (byte[])original.Clone();
                BinaryPrimitives.WriteInt64LittleEndian(lied, lie);
                return (lied, $"header length {lie}");
            }

            string header = Encoding.UTF8.GetString(original, 8, (int)n);
            var (text, op) = MutateText(header, random);
            var headerBytes = Encoding.UTF8.GetBytes(text);
            var result = new byte[8 + headerBytes.Length + (original.Length - 8 - (int)n)];
            BinaryPrimitives.WriteInt64LittleEndian(result, headerBytes.Length);
            headerBytes.CopyTo(result, 8);
            original.AsSpan(8 + (int)n).CopyTo(result.AsSpan(8 + headerBytes.Length));
            return (result, "header: " + op);
        }

        switch (random.Next(5))
        {
            case 0:
            {
                int at = random.Next(original.Length + 1);
                return (original[..at], $"truncated at {at}");
            }

            case 1:
            {
                var bytes = (byte[])original.Clone();
                int at = random.Next(Math.Max(1, bytes.Length));
                if (bytes.Length > 0) bytes[at] = (byte)random.Next(256);
                return (bytes, $"byte {at} set");
            }

            default:
            {
                string text;
                try
                {
                    text = new UTF8Encoding(false, true).GetString(original);
                }
                catch (DecoderFallbackException)
                {
                    var bytes = (byte[])original.Clone();
                    int at = random.Next(bytes.Length);
                    bytes[at] ^= (byte)(1 << random.Next(8));
                    return (bytes, $"bit flipped at {at}");
                }

                var (mutated, op) = MutateText(text, random);
                if (random.Next(8) == 0)
                {
                    var raw = Encoding.UTF8.GetBytes(mutated).ToList();
                    int at = random.Next(raw.Count + 1);
                    raw.InsertRange(at, new byte[] { 0xC3 }); // a lone lead byte: invalid UTF-8
                    return (raw.ToArray(), op + ", invalid UTF-8");
                }

                return (Encoding.UTF8.GetBytes(mutated), op);
            }
        }
    }

    private static readonly Regex NumberLiteral = new(@"-?\b\d+(\.\d+)?([eE][-+]?\d+)?\b", RegexOptions.Compiled);
    private static readonly Regex StringLiteral = new(@"""(?:[^""\\]|\\.)*""", RegexOptions.Compiled);

    private static (string Text, string Op) MutateText(string text, Random random)
    {
        string hostile = Hostile[random.Next(Hostile.Length)];
        switch (random.Next(6))
        {
            case 0:
            {
                var m = NumberLiteral.Matches(text);
                if (m.Count == 0) goto default;
                var pick = m[random.Next(m.Count)];
                return (text[..pick.Index] + hostile + text[(pick.Index + pick.Length)..], $"number {pick.Value} -> {hostile}");
            }

            case 1:
            {
                var m = StringLiteral.Matches(text);
                if (m.Count == 0) goto default;
                var pick = m[random.Next(m.Count)];
                return (text[..pick.Index] + hostile + text[(pick.Index + pick.Length)..], $"string {Clip(pick.Value)} -> {hostile}");
            }

            case 2:
            {
                // A duplicate key: a key of the file inserted again at the start of an object.
                var keys = StringLiteral.Matches(text).Where(k => k.Index + k.Length < text.Length && text[k.Index + k.Length] == ':').ToList();
                int brace = text.IndexOf('{', random.Next(text.Length + 1));
                if (keys.Count == 0 || brace < 0) goto default;
                string key = keys[random.Next(keys.Count)].Value;
                return (text[..(brace + 1)] + $"{key}: {hostile}, " + text[(brace + 1)..], $"duplicate {Clip(key)}: {hostile}");
            }

            case 3:
            {
                int at = random.Next(text.Length + 1);
                int length = Math.Min(text.Length - at, 1 + random.Next(16));
                return (text.Remove(at, length), $"deleted {length} at {at}");
            }

            default:
            {
                int at = random.Next(text.Length + 1);
                string junk = Junk[random.Next(Junk.Length)];
                return (text.Insert(at, junk), $"inserted {Clip(junk)} at {at}");
            }
        }
    }

    private static string Clip(string s) => s.Length <= 30 ? s : s[..30] + "...";
}
