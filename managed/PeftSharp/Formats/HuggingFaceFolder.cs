using System.Text.Json;
using System.Text.Json.Nodes;
using PeftSharp.Data;
using PeftSharp.Engine;
using PeftSharp.Model;

namespace PeftSharp.Formats;

/// <summary>
/// Hugging Face model folders: config.json plus model.safetensors, or shards model-0000k-of-0000n.safetensors with
/// model.safetensors.index.json mapping each tensor to its file. Tensors convert to fp32 on load (F32, F16, BF16).
/// Missing, unexpected or misshapen tensors are one error listing every offender.
/// </summary>
public static class HuggingFaceFolder
{
    public const string ConfigFile = "config.json";
    public const string SingleFile = "model.safetensors";
    public const string IndexFile = "model.safetensors.index.json";

    public static LlamaConfig ReadConfig(string folder)
    {
        string path = Path.Combine(folder, ConfigFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{folder}: no {ConfigFile}; is this a Hugging Face model folder?", path);
        return LlamaConfig.Parse(File.ReadAllText(path), path);
    }

    /// <summary>Loads the model in <paramref name="folder"/> onto <paramref name="device"/>.</summary>
    /// <param name="warn">Told of each tensor that holds NaN or infinite values (the model loads; its outputs will show it).</param>
    public static LlamaModel Load(string folder, Device device, Action<string>? warn = null) =>
        InputGuard.Parse(folder, () => LoadCore(folder, device, warn));

    private static LlamaModel LoadCore(string folder, Device device, Action<string>? warn)
    {
        var config = ReadConfig(folder);
        ModelMemory.EnsureWeightsFit(device, config, Path.Combine(folder, ConfigFile));
        if (File.Exists(Path.Combine(folder, Compression.LordModel.ConfigFile)))
        {
            if (File.Exists(Path.Combine(folder, SingleFile)) || File.Exists(Path.Combine(folder, IndexFile)))
            {
                throw new PeftSharpInputException($"{folder}: holds both a LoRD model ({Compression.LordModel.ConfigFile}) and dense weights ({SingleFile}); which one is meant is unclear");
            }

            var lord = Compression.LordModel.Read(folder, config);
            return WithFolderFiles(LlamaModel.FromTensors(device, config, (name, _) => lord.Weight(name)), folder);
        }

        var files = OpenTensorFiles(folder, out var owner);
        try
        {
            var expected = LlamaModel.ParameterShapes(config).ToDictionary(s => s.Name, s => s.Shape);
            var present = owner.Keys; // a sharded folder's tensors are those its index maps
            var problems = new List<string>();
            foreach (var (name, shape) in expected)
            {
                if (!present.Contains(name))
                {
                    problems.Add($"missing {name} [{string.Join(", ", shape)}]{(File.Exists(Path.Combine(folder, IndexFile)) ? $" (not in {IndexFile})" : "")}");
                    continue;
                }

                var entry = owner[name][name];
                if (!entry.Shape.Select(d => (int)d).SequenceEqual(shape))
                {
                    problems.Add($"{name} is {entry.ShapeText}, expected [{string.Join(", ", shape)}]");
                }
            }

            // A tied model may still carry lm_head.weight (some exporters write it); rotary caches are derived data;
            // integer and boolean buffers (position ids, masks) are skipped with a warning, as transformers skips them.
            // An unexpected floating-point tensor is refused: it may be a weight (a bias, a norm) the model would ignore.
            foreach (var name in present)
            {
                if (expected.ContainsKey(name) || (name == "lm_head.weight" && config.TieWordEmbeddings) || name.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal)) continue;
                var entry = owner[name][name];
                if (entry.DType is "F64" or "F32" or "F16" or "BF16" or "F8_E4M3" or "F8_E5M2") problems.Add($"unexpected tensor {name} ({entry.DType})");
                else warn?.Invoke($"{owner[name].Path}: skipping tensor {name} ({entry.DType} {entry.ShapeText}), which the model does not use");
            }

            if (problems.Count > 0)
            {
                throw new PeftSharpInputException($"{folder}: the weights do not match config.json ({problems.Count} problems): {string.Join("; ", problems)}");
            }

            var model = LlamaModel.FromTensors(device, config, (string name, int[] _, Span<float> values) =>
            {
                owner[name].ReadFloats(name, values);
                if (warn != null && FiniteValues.Beyond(values).Count is int bad and > 0) warn($"{owner[name].Path}: tensor {name} holds {bad} NaN or infinite values of {values.Length}");
            });
            return WithFolderFiles(model, folder);
        }
        finally
        {
            foreach (var f in files) f.Dispose();
        }
    }

    /// <summary>The folder's tokenizer files and generation_config.json's stop tokens, given to a model just loaded from it.</summary>
    private static LlamaModel WithFolderFiles(LlamaModel model, string folder)
    {
        try
        {
            model.UseTokenizerFiles(folder, HfTokenizer.ReadFiles(folder));
            model.StopTokens = GenerationConfig.Read(folder).EosTokenIds ?? Array.Empty<int>();
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

        private static List<SafeTensorsFile> OpenTensorFiles(string folder, out Dictionary<string, SafeTensorsFile> owner)
    {
        string single = Path.Combine(folder, SingleFile);
        string index = Path.Combine(folder, IndexFile);
        var files = new List<SafeTensorsFile>();
        try
        {
            if (File.Exists(index))
            {
                JsonNode? root;
                try
                {
                    root = JsonNode.Parse(File.ReadAllText(index));
                }
                catch (JsonException e)
                {
                    throw new PeftSharpInputException($"{index}: not valid JSON: {e.Message}", e);
                }

                if (root?["weight_map"] is not JsonObject map) throw new PeftSharpInputException($"{index}: no weight_map object");
                var byFile = new Dictionary<string, SafeTensorsFile>();
                owner = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
                foreach (var (name, fileNode) in map)
                {
                    string file = fileNode?.Value<string>() ?? throw new PeftSharpInputException($"{index}: weight_map entry {name} is not a file name");
                    if (file.Contains('/') || file.Contains('\\') || file.Contains("..")) throw new PeftSharpInputException($"{index}: shard name '{file}' leaves the folder");
                    if (!byFile.TryGetValue(file, out var f))
                    {
                        if (!File.Exists(Path.Combine(folder, file))) throw new PeftSharpInputException($"{index}: maps {name} to {file}, which is not in the folder");
                        f = SafeTensorsFile.Open(Path.Combine(folder, file));
                        byFile[file] = f;
                        files.Add(f);
                    }

                    if (!f.Contains(name)) throw new PeftSharpInputException($"{index}: maps {name} to {file}, which does not contain it");
                    owner[name] = f;
                }

            }
            else if (File.Exists(single))
            {
                var f = SafeTensorsFile.Open(single);
                files.Add(f);
                owner = f.Tensors.ToDictionary(t => t.Name, _ => f, StringComparer.Ordinal);
            }
            else
            {
                throw new FileNotFoundException($"{folder}: neither {SingleFile} nor {IndexFile} found");
            }

            return files;
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Writes config.json and the weights (one file, or shards of at most <paramref name="maxShardBytes"/> with an
    /// index). Every file is written to a temporary name and renamed.
    /// </summary>
    public static void Save(LlamaModel model, string folder, StorageType type = StorageType.F32, long maxShardBytes = long.MaxValue)
    {
        Directory.CreateDirectory(folder);
        var tensors = model.Parameters.Select(p => new SafeTensorData(p.Name, p.Value.ToArray(), p.Value.Shape.ToArray(), type)).ToList();
        var meta = new Dictionary<string, string> { ["format"] = "pt" };
        var shards = new List<List<SafeTensorData>> { new() };
        long size = 0;
        foreach (var t in tensors)
        {
            long bytes = (long)t.Values.Length * Precision.Size(type);
            if (shards[^1].Count > 0 && size + bytes > maxShardBytes)
            {
                shards.Add(new List<SafeTensorData>());
                size = 0;
            }

            shards[^1].Add(t);
            size += bytes;
        }

        if (shards.Count == 1)
        {
            SafeTensorsWriter.Write(Path.Combine(folder, SingleFile), tensors, meta);
        }
        else
        {
            var map = new JsonObject();
            long total = 0;
            for (int i = 0; i < shards.Count; i++)
            {
                string name = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                SafeTensorsWriter.Write(Path.Combine(folder, name), shards[i], meta);
                foreach (var t in shards[i])
                {
                    map[t.Name] = name;
                    total += (long)t.Values.Length * Precision.Size(type);
                }
            }

            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = map };
            AtomicFile.WriteText(Path.Combine(folder, IndexFile), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }

        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), model.Config.ToJson());
        HfTokenizer.WriteFiles(folder, model.TokenizerFiles);
    }
}
