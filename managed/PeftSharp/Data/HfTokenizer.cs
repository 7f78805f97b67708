using PeftSharp.Formats;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace PeftSharp.Data;

/// <summary>
/// A Hugging Face model folder's tokenizer, through Microsoft.ML.Tokenizers:
/// <list type="bullet">
/// <item><c>tokenizer.json</c> with a byte-level BPE model (GPT-2, Llama 3, Qwen, ...): added tokens split out first,
/// then the normalizer (none, NFC/NFD/NFKC/NFKD, Lowercase), the pre-tokenizer (ByteLevel with or without its regex,
/// Split by regex or string with behavior Isolated or Removed, Digits, Sequence of these), then the BPE merges
/// (Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/>, one pre-token at a time), honouring <c>ignore_merges</c>.</item>
/// <item><c>tokenizer.model</c> (SentencePiece BPE or Unigram, Llama 1/2, Mistral, Gemma ...):
/// <see cref="SentencePieceTokenizer"/>.</item>
/// </list>
/// When a folder has both, a byte-level tokenizer.json is preferred, else tokenizer.model. Anything else (WordPiece,
/// Unigram or non-byte-level BPE in tokenizer.json without a tokenizer.model, unknown pre-tokenizers or normalizers)
/// is an error naming the file and the part. BOS, EOS and PAD come from tokenizer_config.json (<c>bos_token</c>,
/// <c>eos_token</c>, <c>pad_token</c>, <c>add_bos_token</c>), then the post-processor's template, then
/// generation_config.json / config.json ids.
/// </summary>
public sealed partial class HfTokenizer : ITokenizer
{
    public const string JsonFile = "tokenizer.json";
    public const string SentencePieceFile = "tokenizer.model";
    public const string ConfigFile = "tokenizer_config.json";

    /// <summary>The files a model folder's tokenizer consists of (copied along when a model folder is written).</summary>
    public static readonly string[] FolderFiles = { JsonFile, SentencePieceFile, ConfigFile, "special_tokens_map.json" };

    // GPT-2's ByteLevel pre-tokenizer regex (use_regex: true).
    private const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly Func<string, bool, List<int>> encodeSegment; // (segment, whether it starts the text)
    private readonly Func<IReadOnlyList<int>, string> decodeRun;
    private readonly Dictionary<int, (string Content, bool Special)> addedById;
    private readonly Regex? addedPattern;
    private readonly Dictionary<string, int> addedByContent;
    private readonly Dictionary<string, (bool Left, bool Right)> addedStrip;

    private HfTokenizer(string name, int vocabSize, Func<string, bool, List<int>> encodeSegment, Func<IReadOnlyList<int>, string> decodeRun,
        IReadOnlyList<AddedToken> added)
    {
        Name = name;
        this.encodeSegment = encodeSegment;
        this.decodeRun = decodeRun;
        addedById = added.ToDictionary(a => a.Id, a => (a.Content, a.Special));
        addedByContent = added.GroupBy(a => a.Content).ToDictionary(g => g.Key, g => g.First().Id);
        addedStrip = added.GroupBy(a => a.Content).ToDictionary(g => g.Key, g => (g.First().LeftStrip, g.First().RightStrip));
        if (added.Count > 0)
        {
            // Longest first, so "<|end|>" never wins over "<|end_of_text|>".
            addedPattern = new Regex(string.Join("|", added.Select(a => a.Content).Distinct().OrderByDescending(c => c.Length).Select(Regex.Escape)), RegexOptions.CultureInvariant);
        }

        VocabSize = Math.Max(vocabSize, added.Count == 0 ? 0 : added.Max(a => a.Id) + 1);
    }

    public string Name { get; }

    public int VocabSize { get; }

    public int? Bos { get; private set; }

    public int? Eos { get; private set; }

    public int Pad { get; private set; }

    /// <summary>Whether <paramref name="folder"/> holds a tokenizer.json or tokenizer.model.</summary>
    public static bool Present(string folder) => File.Exists(Path.Combine(folder, JsonFile)) || File.Exists(Path.Combine(folder, SentencePieceFile));

    /// <summary>
    /// The tokenizer a model folder's text goes through: its tokenizer files, else the built-in byte tokenizer when the
    /// model's vocab_size is 259; otherwise an error naming the folder.
    /// </summary>
    public static ITokenizer ForFolder(string folder, int vocabSize)
    {
        CheckFolder(folder, vocabSize);
        return Present(folder) ? Load(folder) : ByteTokenizer.Instance;
    }

    /// <summary>The error <see cref="ForFolder"/> would give, without reading the tokenizer (to fail before loading weights).</summary>
    public static void CheckFolder(string folder, int vocabSize)
    {
        if (!Present(folder) && vocabSize != ByteTokenizer.VocabSize)
        {
            throw new NotSupportedException($"{folder}: vocab_size {vocabSize} and no {JsonFile} or {SentencePieceFile}, so text cannot be encoded for it (only vocab_size " +
                $"{ByteTokenizer.VocabSize} models use the built-in byte tokenizer)");
        }
    }

    /// <summary>Reads the tokenizer of a Hugging Face model folder (see the class summary for what is supported).</summary>
    public static HfTokenizer Load(string folder) =>
        InputGuard.Parse(folder, () => LoadCore(folder));

    private static HfTokenizer LoadCore(string folder)
    {
        string json = Path.Combine(folder, JsonFile);
        string model = Path.Combine(folder, SentencePieceFile);
        if (!File.Exists(json) && !File.Exists(model)) throw new FileNotFoundException($"{folder}: no {JsonFile} or {SentencePieceFile}", json);
        JsonObject? config = ReadJson(Path.Combine(folder, ConfigFile));
        HfTokenizer result;
        if (File.Exists(json))
        {
            var doc = ReadJson(json)!;
            string? unsupported = ByteLevelBpeProblem(doc);
            if (unsupported == null)
            {
                result = InputGuard.Parse(json, () => FromTokenizerJson(json, doc, config));
            }
            else if (!File.Exists(model) && IsSentencePieceStyleBpe(doc))
            {
                result = InputGuard.Parse(json, () => FromSentencePieceStyleJson(json, doc, config));
            }
            else if (File.Exists(model))
            {
                result = InputGuard.Parse(model, () => FromSentencePiece(model, config));
            }
            else
            {
                throw new NotSupportedException($"{json}: {unsupported}; byte-level BPE and SentencePiece-style BPE (byte fallback, Metaspace) tokenizer.json files are read " +
                    $"(a SentencePiece model's tokenizer.model is read instead when the folder has one)");
            }
        }
        else
        {
            result = InputGuard.Parse(model, () => FromSentencePiece(model, config));
        }

        result.ResolveIdsFromModelConfig(folder);
        return result;
    }

    /// <summary>The tokenizer files of a model folder (<see cref="FolderFiles"/>) by name, as bytes.</summary>
    public static IReadOnlyDictionary<string, byte[]> ReadFiles(string folder) =>
        FolderFiles.Where(f => File.Exists(Path.Combine(folder, f))).ToDictionary(f => f, f => File.ReadAllBytes(Path.Combine(folder, f)));

    /// <summary>Writes tokenizer files into <paramref name="folder"/>, each to a temporary name and renamed.</summary>
    public static void WriteFiles(string folder, IReadOnlyDictionary<string, byte[]> files)
    {
        foreach (var (name, bytes) in files)
        {
            PeftSharp.Formats.AtomicFile.Write(Path.Combine(folder, name), s => s.Write(bytes));
        }
    }

    public int[] Encode(string text)
    {
        var ids = new List<int>();
        if (addedPattern == null)
        {
            ids.AddRange(encodeSegment(text, true));
            return ids.ToArray();
        }

        int at = 0;
        foreach (Match m in addedPattern.Matches(text))
        {
            if (m.Index < at) continue; // inside whitespace an rstrip token absorbed
            // lstrip / rstrip: the token absorbs the whitespace on that side, as Hugging Face's added tokens do.
            var (left, right) = addedStrip[m.Value];
            int end = m.Index;
            if (left) while (end > at && char.IsWhiteSpace(text[end - 1])) end--;
            if (end > at) ids.AddRange(encodeSegment(text[at..end], at == 0));
            ids.Add(addedByContent[m.Value]);
            at = m.Index + m.Length;
            if (right) while (at < text.Length && char.IsWhiteSpace(text[at])) at++;
        }

        if (at < text.Length) ids.AddRange(encodeSegment(text[at..], at == 0));
        return ids.ToArray();
    }

    public string Decode(IEnumerable<int> ids)
    {
        var text = new StringBuilder();
        var run = new List<int>();
        foreach (int id in ids)
        {
            if (addedById.TryGetValue(id, out var a))
            {
                if (run.Count > 0) text.Append(decodeRun(run));
                run.Clear();
                if (!a.Special) text.Append(a.Content);
            }
            else if (id >= 0 && id < VocabSize)
            {
                run.Add(id);
            }
        }

        if (run.Count > 0) text.Append(decodeRun(run));
        return text.ToString();
    }

    /// <summary>A JSON object file, or null when the file is absent; malformed JSON names the file.</summary>
    internal static JsonObject? ReadJson(string path)
    {
        if (!File.Exists(path)) return null;
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new PeftSharpInputException($"{path}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new PeftSharpInputException($"{path}: not valid JSON: {e.Message}", e);
        }
    }

    /// <summary>Null when the tokenizer.json is a byte-level BPE this class reads, else what it is instead.</summary>
    private static string? ByteLevelBpeProblem(JsonObject doc)
    {
        var model = doc["model"] as JsonObject;
        string? type = model?["type"]?.Value<string>();
        if (type == null && model?["merges"] != null) type = "BPE"; // older files leave the type out
        if (type != "BPE") return $"model type {type ?? "(none)"} is not BPE";
        bool byteLevel = Mentions(doc["pre_tokenizer"], "ByteLevel") || Mentions(doc["decoder"], "ByteLevel");
        if (!byteLevel) return "a BPE model without a ByteLevel pre-tokenizer";
        return null;
    }

    private static bool Mentions(JsonNode? node, string type) => node switch
    {
        JsonObject o => o["type"]?.Value<string>() == type || o.Any(kv => Mentions(kv.Value, type)),
        JsonArray a => a.Any(n => Mentions(n, type)),
        _ => false,
    };

    /// <summary>A tokenizer.json BPE model's vocabulary (token to id).</summary>
    private static Dictionary<string, int> BpeVocabulary(string path, JsonObject model)
    {
        var vocabNode = model["vocab"] as JsonObject ?? throw new PeftSharpInputException($"{path}: model.vocab is missing or not an object");
        var vocab = new Dictionary<string, int>(vocabNode.Count);
        foreach (var (token, id) in vocabNode) vocab[token] = id!.Value<int>();
        return vocab;
    }

    /// <summary>A tokenizer.json BPE model's merges in rank order, each as "a b" (older files write that, newer ones ["a", "b"]).</summary>
    private static List<string> BpeMerges(string path, JsonObject model)
    {
        var merges = new List<string>();
        if (model["merges"] is not JsonArray mergeArray) return merges;
        int i = 0;
        foreach (var m in mergeArray)
        {
            // Neither byte-level nor SentencePiece tokens contain a space ("▁" stands for it).
            string merge = m switch
            {
                JsonArray pair when pair.Count == 2 => $"{pair[0]!.Value<string>()} {pair[1]!.Value<string>()}",
                JsonValue v when v.TryGetValue<string>(out var s) => s,
                _ => throw new PeftSharpInputException($"{path}: model.merges[{i}] is neither \"a b\" nor [\"a\", \"b\"]"),
            };
            merges.Add(merge);
            i++;
        }

        return merges;
    }

    private static HfTokenizer FromTokenizerJson(string path, JsonObject doc, JsonObject? config)
    {
        var model = (JsonObject)doc["model"]!;
        var vocab = BpeVocabulary(path, model);
        var merges = BpeMerges(path, model);

        if (model["dropout"] is JsonValue dropout && dropout.Value<double>() != 0) throw new NotSupportedException($"{path}: BPE dropout is a training-time option; set model.dropout to null");
        // GPT-2's file writes both as "" (none); a real prefix or suffix is a WordPiece-style BPE this class does not read.
        if (model["continuing_subword_prefix"] is JsonValue cp && cp.Value<string>().Length > 0 || model["end_of_word_suffix"] is JsonValue ew && ew.Value<string>().Length > 0)
        {
            throw new NotSupportedException($"{path}: continuing_subword_prefix / end_of_word_suffix are not supported with byte-level BPE");
        }

        bool ignoreMerges = model["ignore_merges"] is JsonValue im && im.Value<bool>();
        var normalize = Normalizer(path, doc["normalizer"]);
        var preTokenize = PreTokenizerOf(path, doc["pre_tokenizer"]);
        var added = AddedTokens(path, doc);

        var bpe = BpeTokenizer.Create(new BpeOptions(vocab)
        {
            Merges = merges,
            ByteLevel = true,
            PreTokenizer = new WholeText(),
        });
        var byteChar = ByteToUnicode();
        List<int> EncodeSegment(string segment, bool atStart)
        {
            var ids = new List<int>();
            foreach (var piece in preTokenize(normalize(segment)))
            {
                if (piece.Length == 0) continue;
                if (ignoreMerges)
                {
                    var mapped = new StringBuilder();
                    foreach (byte b in Encoding.UTF8.GetBytes(piece)) mapped.Append(byteChar[b]);
                    if (vocab.TryGetValue(mapped.ToString(), out int whole))
                    {
                        ids.Add(whole);
                        continue;
                    }
                }

                ids.AddRange(bpe.EncodeToIds(piece, considerPreTokenization: true, considerNormalization: false));
            }

            return ids;
        }

        var tok = new HfTokenizer($"{JsonFile} (byte-level BPE, {vocab.Count} tokens)", vocab.Values.Max() + 1, EncodeSegment, run => bpe.Decode(run), added);
        tok.ResolveSpecials(path, config, doc, vocab);
        return tok;
    }

    private static HfTokenizer FromSentencePiece(string path, JsonObject? config)
    {
        var spec = SentencePieceSpec.Read(path);
        if (spec.HasCharsMap)
        {
            throw new NotSupportedException($"{path}: normalizer '{spec.NormalizerName}' uses a precompiled character map, which Microsoft.ML.Tokenizers does not apply (its ids would " +
                $"differ from SentencePiece's on text that the map changes); only models with the 'identity' normalizer (Llama, Mistral, Gemma) are read");
        }

        if (spec.ModelType == SentencePieceSpec.Unigram && spec.ByteFallback)
        {
            throw new NotSupportedException($"{path}: a SentencePiece Unigram model with byte fallback; Microsoft.ML.Tokenizers 2.0.1 gives byte pieces wrong ids there, so it is refused " +
                $"(BPE models with byte fallback and Unigram models without are read)");
        }

        SentencePieceTokenizer sp;
        try
        {
            using var stream = File.OpenRead(path);
            sp = SentencePieceTokenizer.Create(stream, addBeginningOfSentence: false, addEndOfSentence: false);
        }
        catch (Exception e) when (e is not (FileNotFoundException or DirectoryNotFoundException or UnauthorizedAccessException))
        {
            throw new PeftSharpInputException($"{path}: not a SentencePiece model Microsoft.ML.Tokenizers can read: {e.Message}", e);
        }

        int size = sp.Vocabulary.Values.Max() + 1;
        var tok = new HfTokenizer($"{SentencePieceFile} (SentencePiece, {size} pieces)", size,
            (s, _) => spec.ModelType == SentencePieceSpec.Unigram
                ? FuseUnknown(sp.EncodeToIds(s, addBeginningOfSentence: false, addEndOfSentence: false), sp.UnknownId)
                : sp.EncodeToIds(s, addBeginningOfSentence: false, addEndOfSentence: false).ToList(),
            run => sp.Decode(run, considerSpecialTokens: false),
            Array.Empty<AddedToken>());
        tok.Bos = sp.BeginningOfSentenceId >= 0 ? sp.BeginningOfSentenceId : null;
        tok.Eos = sp.EndOfSentenceId >= 0 ? sp.EndOfSentenceId : null;
        if (config?["add_bos_token"] is JsonValue addBos && !addBos.Value<bool>()) tok.Bos = null;
        var vocab = sp.Vocabulary.ToDictionary(kv => kv.Key, kv => kv.Value);
        if (TokenText(config?["bos_token"]) is string b && vocab.TryGetValue(b, out int bid) && tok.Bos != null) tok.Bos = bid;
        if (TokenText(config?["eos_token"]) is string e2 && vocab.TryGetValue(e2, out int eid)) tok.Eos = eid;
        tok.Pad = TokenText(config?["pad_token"]) is string p && vocab.TryGetValue(p, out int pid) ? pid : tok.Eos ?? 0;
        return tok;
    }

    /// <summary>SentencePiece's Unigram encoder emits one unknown piece for a run of unknown characters; the library emits one per character.</summary>
    private static List<int> FuseUnknown(IReadOnlyList<int> ids, int unknown)
    {
        var fused = new List<int>(ids.Count);
        foreach (int id in ids)
        {
            if (id == unknown && fused.Count > 0 && fused[^1] == unknown) continue;
            fused.Add(id);
        }

        return fused;
    }

    /// <summary>An entry of tokenizer.json's added_tokens: matched in the raw text before anything else.</summary>
    private sealed record AddedToken(string Content, int Id, bool Special, bool LeftStrip, bool RightStrip);

    private static IReadOnlyList<AddedToken> AddedTokens(string path, JsonObject doc)
    {
        var result = new List<AddedToken>();
        if (doc["added_tokens"] is not JsonArray added) return result;
        int i = 0;
        foreach (var node in added)
        {
            if (node is not JsonObject a || a["content"] is not JsonValue c || a["id"] is not JsonValue id)
            {
                throw new PeftSharpInputException($"{path}: added_tokens[{i}] needs \"id\" and \"content\"");
            }

            bool Flag(string key) => a[key] is JsonValue f && f.Value<bool>();
            result.Add(new AddedToken(c.Value<string>(), id.Value<int>(), Flag("special"), Flag("lstrip"), Flag("rstrip")));
            i++;
        }

        return result;
    }

    /// <summary>tokenizer_config.json's bos/eos/pad, else the post-processor's template for BOS.</summary>
    private void ResolveSpecials(string path, JsonObject? config, JsonObject doc, Dictionary<string, int> vocab)
    {
        int? IdOf(string? token) => token == null ? null : addedByContent.TryGetValue(token, out int a) ? a : vocab.TryGetValue(token, out int v) ? v : null;
        string? templateBos = null;
        if (doc["post_processor"] is JsonObject pp)
        {
            var processors = pp["type"]?.Value<string>() == "Sequence" && pp["processors"] is JsonArray arr ? arr.OfType<JsonObject>() : new[] { pp };
            foreach (var proc in processors)
            {
                if (proc["type"]?.Value<string>() == "TemplateProcessing" && proc["single"] is JsonArray single && single.Count > 0
                    && single[0] is JsonObject first && first["SpecialToken"] is JsonObject st)
                {
                    templateBos = st["id"]?.Value<string>();
                }
            }
        }

        string? bosText = TokenText(config?["bos_token"]);
        bool addBos = config?["add_bos_token"] is JsonValue ab ? ab.Value<bool>() : templateBos != null;
        Bos = addBos ? IdOf(bosText ?? templateBos) : null;
        if (addBos && Bos == null) throw new PeftSharpInputException($"{path}: a BOS token is to be added but '{bosText ?? templateBos}' is not in the vocabulary");
        Eos = IdOf(TokenText(config?["eos_token"]));
        Pad = IdOf(TokenText(config?["pad_token"])) ?? Eos ?? 0;
    }

    /// <summary>EOS from generation_config.json or config.json when the tokenizer files do not name one.</summary>
    private void ResolveIdsFromModelConfig(string folder)
    {
        if (Eos != null) return;
        foreach (var file in new[] { "generation_config.json", "config.json" })
        {
            var json = ReadJson(Path.Combine(folder, file));
            var node = json?["eos_token_id"];
            int? id = node switch
            {
                JsonArray a when a.Count > 0 => a[0]!.Value<int>(),
                JsonValue v when v.TryGetValue<int>(out int x) => x,
                _ => null,
            };
            if (id != null)
            {
                Eos = id;
                if (Pad == 0) Pad = id.Value;
                return;
            }
        }
    }

    /// <summary>A token in tokenizer_config.json: "text" or {"content": "text", ...}.</summary>
    internal static string? TokenText(JsonNode? node) => node switch
    {
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        JsonObject o when o["content"] is JsonValue c => c.Value<string>(),
        _ => null,
    };

    private static Func<string, string> Normalizer(string path, JsonNode? node)
    {
        if (node is null) return s => s;
        if (node is not JsonObject o) throw new PeftSharpInputException($"{path}: normalizer is not an object");
        string? type = o["type"]?.Value<string>();
        switch (type)
        {
            // Real normalization in every globalization mode (string.Normalize alone is a no-op in invariant mode).
            case "NFC": return s => UnicodeNormalizer.Normalize(s, NormalizationForm.FormC, path);
            case "NFD": return s => UnicodeNormalizer.Normalize(s, NormalizationForm.FormD, path);
            case "NFKC": return s => UnicodeNormalizer.Normalize(s, NormalizationForm.FormKC, path);
            case "NFKD": return s => UnicodeNormalizer.Normalize(s, NormalizationForm.FormKD, path);
            case "Lowercase": return s => s.ToLowerInvariant();
            case "Prepend":
            {
                // Llama 2's legacy files prepend the SentencePiece space marker to every segment that is not empty.
                string prepend = o["prepend"]?.Value<string>() ?? throw new PeftSharpInputException($"{path}: Prepend normalizer without 'prepend'");
                return s => s.Length == 0 ? s : prepend + s;
            }

            case "Replace":
            {
                var pattern = o["pattern"] as JsonObject ?? throw new PeftSharpInputException($"{path}: Replace normalizer without a pattern");
                string content = o["content"]?.Value<string>() ?? throw new PeftSharpInputException($"{path}: Replace normalizer without 'content'");
                if (pattern["String"] is JsonValue str)
                {
                    string find = str.Value<string>();
                    return s => find.Length == 0 ? s : s.Replace(find, content, StringComparison.Ordinal);
                }

                var regex = pattern["Regex"] is JsonValue r ? FileRegex(path, r.Value<string>()) : throw new PeftSharpInputException($"{path}: Replace pattern is neither String nor Regex");
                return s => Timed(path, regex, () => new List<string> { regex.Replace(s, content.Replace("$", "$$", StringComparison.Ordinal)) })[0];
            }

            case "Sequence":
                var parts = (o["normalizers"] as JsonArray ?? new JsonArray()).Select(n => Normalizer(path, n)).ToList();
                return s => parts.Aggregate(s, (acc, f) => f(acc));
            default:
                throw new NotSupportedException($"{path}: normalizer type {type ?? "(none)"} is not supported (supported: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Sequence)");
        }
    }

    /// <summary>The pre-tokenizer as a function from text to pieces.</summary>
    private static Func<string, IEnumerable<string>> PreTokenizerOf(string path, JsonNode? node)
    {
        if (node is null) return s => new[] { s };
        if (node is not JsonObject o) throw new PeftSharpInputException($"{path}: pre_tokenizer is not an object");
        string? type = o["type"]?.Value<string>();
        switch (type)
        {
            case "Sequence":
                var steps = (o["pretokenizers"] as JsonArray ?? new JsonArray()).Select(n => PreTokenizerOf(path, n)).ToList();
                return s => steps.Aggregate((IEnumerable<string>)new[] { s }, (pieces, step) => pieces.SelectMany(step).ToList());
            case "ByteLevel":
            {
                bool prefixSpace = o["add_prefix_space"] is JsonValue ap && ap.Value<bool>();
                bool useRegex = o["use_regex"] is not JsonValue ur || ur.Value<bool>();
                var regex = new Regex(Gpt2Pattern, RegexOptions.CultureInvariant);
                return s =>
                {
                    if (prefixSpace && !s.StartsWith(' ')) s = " " + s;
                    return useRegex ? Isolate(regex, s) : new[] { s };
                };
            }

            case "Split":
            {
                var pattern = o["pattern"] as JsonObject ?? throw new PeftSharpInputException($"{path}: Split pre-tokenizer without a pattern");
                Regex regex = pattern["Regex"] is JsonValue r
                    ? FileRegex(path, r.Value<string>())
                    : pattern["String"] is JsonValue str
                        ? new Regex(Regex.Escape(str.Value<string>()), RegexOptions.CultureInvariant)
                        : throw new PeftSharpInputException($"{path}: Split pattern is neither Regex nor String");
                string behavior = o["behavior"]?.Value<string>() ?? "Isolated";
                if (o["invert"] is JsonValue inv && inv.Value<bool>()) throw new NotSupportedException($"{path}: Split with invert: true is not supported");
                return behavior switch
                {
                    "Isolated" => s => Timed(path, regex, () => Isolate(regex, s)),
                    "Removed" => s => Timed(path, regex, () => Isolate(regex, s, keepMatches: false)),
                    _ => throw new NotSupportedException($"{path}: Split behavior {behavior} is not supported (Isolated, Removed)"),
                };
            }

            case "Digits":
            {
                bool individual = o["individual_digits"] is JsonValue id && id.Value<bool>();
                var regex = new Regex(individual ? @"\p{Nd}" : @"\p{Nd}+", RegexOptions.CultureInvariant);
                return s => Isolate(regex, s);
            }

            default:
                throw new NotSupportedException($"{path}: pre_tokenizer type {type ?? "(none)"} is not supported (supported: ByteLevel, Split, Digits, Sequence)");
        }
    }

    /// <summary>How long one match of a pattern from a file may run before the text is refused (a pattern such as (a+)+$ backtracks exponentially).</summary>
    private static readonly TimeSpan FileRegexTimeout = TimeSpan.FromSeconds(1);

    /// <summary>A regular expression from <paramref name="path"/>, with a match timeout; one that does not compile names the file and the pattern.</summary>
    private static Regex FileRegex(string path, string pattern)
    {
        try
        {
            return new Regex(pattern, RegexOptions.CultureInvariant, FileRegexTimeout);
        }
        catch (ArgumentException e)
        {
            throw new PeftSharpInputException($"{path}: Split pattern '{pattern}' is not a regular expression .NET compiles: {e.Message}", e);
        }
    }

    /// <summary>Runs a split with a file's pattern; a match that times out is an error naming the file and the pattern, not a hang.</summary>
    private static List<string> Timed(string path, Regex regex, Func<List<string>> split)
    {
        try
        {
            return split();
        }
        catch (RegexMatchTimeoutException e)
        {
            throw new PeftSharpInputException($"{path}: Split pattern '{regex}' ran past {FileRegexTimeout.TotalSeconds:F0} s on one input (catastrophic backtracking); the text was not tokenized", e);
        }
    }

    /// <summary>Matches become pieces of their own (or are dropped), the text between them too.</summary>
    private static List<string> Isolate(Regex regex, string s, bool keepMatches = true)
    {
        var pieces = new List<string>();
        int at = 0;
        foreach (Match m in regex.Matches(s))
        {
            if (m.Length == 0) continue;
            if (m.Index > at) pieces.Add(s[at..m.Index]);
            if (keepMatches) pieces.Add(m.Value);
            at = m.Index + m.Length;
        }

        if (at < s.Length) pieces.Add(s[at..]);
        return pieces;
    }

    /// <summary>GPT-2's table from bytes to the printable characters byte-level vocabularies are written in.</summary>
    private static char[] ByteToUnicode()
    {
        var map = new char[256];
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)next++;
        }

        return map;
    }

    /// <summary>Hands the whole (already pre-tokenized) piece to the BPE model as one word.</summary>
    private sealed class WholeText : PreTokenizer
    {
        public override IEnumerable<(int Offset, int Length)> PreTokenize(string text) => text.Length == 0 ? Array.Empty<(int, int)>() : new[] { (0, text.Length) };

        public override IEnumerable<(int Offset, int Length)> PreTokenize(ReadOnlySpan<char> text) => text.Length == 0 ? Array.Empty<(int, int)>() : new[] { (0, text.Length) };
    }

    /// <summary>
    /// The few fields of a SentencePiece ModelProto that decide whether Microsoft.ML.Tokenizers encodes it as
    /// SentencePiece does: trainer_spec (2).model_type (3) and .byte_fallback (35), normalizer_spec (3).name (1) and
    /// .precompiled_charsmap (2). Protobuf wire format; a later occurrence of a field wins, as protobuf merges.
    /// </summary>
    internal sealed class SentencePieceSpec
    {
        public const int Unigram = 1;
        public const int Bpe = 2;

        public int ModelType { get; private set; } = Unigram;

        public bool ByteFallback { get; private set; }

        public string NormalizerName { get; private set; } = "nmt_nfkc";

        public bool HasCharsMap { get; private set; }

        public static SentencePieceSpec Read(string path)
        {
            var bytes = File.ReadAllBytes(path);
            var spec = new SentencePieceSpec();
            try
            {
                Walk(bytes, 0, bytes.Length, (field, wire, start, length, value) =>
                {
                    if (wire != 2) return;
                    if (field == 2)
                    {
                        Walk(bytes, start, start + length, (f, w, _, _, v) =>
                        {
                            if (f == 3 && w == 0) spec.ModelType = (int)v;
                            if (f == 35 && w == 0) spec.ByteFallback = v != 0;
                        });
                    }
                    else if (field == 3)
                    {
                        Walk(bytes, start, start + length, (f, w, s, l, _) =>
                        {
                            if (f == 1 && w == 2) spec.NormalizerName = Encoding.UTF8.GetString(bytes, s, l);
                            if (f == 2 && w == 2) spec.HasCharsMap = l > 0;
                        });
                    }
                });
            }
            catch (PeftSharpInputException e)
            {
                throw new PeftSharpInputException($"{path}: not a SentencePiece model: {e.Message}", e);
            }

            return spec;
        }

        /// <summary>Calls <paramref name="visit"/>(field, wire type, payload start, payload length, varint value) for each field in [from, to).</summary>
        private static void Walk(byte[] b, int from, int to, Action<int, int, int, int, ulong> visit)
        {
            int at = from;
            while (at < to)
            {
                int tagAt = at;
                ulong tag = Varint(b, ref at, to);
                int field = (int)(tag >> 3), wire = (int)(tag & 7);
                switch (wire)
                {
                    case 0:
                        visit(field, wire, at, 0, Varint(b, ref at, to));
                        break;
                    case 1:
                        at += 8;
                        break;
                    case 2:
                        ulong length = Varint(b, ref at, to);
                        if (length > (ulong)(to - at)) throw new PeftSharpInputException($"field {field} at byte {tagAt} runs past the end");
                        visit(field, wire, at, (int)length, 0);
                        at += (int)length;
                        break;
                    case 5:
                        at += 4;
                        break;
                    default:
                        throw new PeftSharpInputException($"wire type {wire} at byte {tagAt}");
                }

                if (at > to) throw new PeftSharpInputException($"field {field} at byte {tagAt} runs past the end");
            }
        }

        private static ulong Varint(byte[] b, ref int at, int to)
        {
            ulong v = 0;
            for (int shift = 0; shift < 64; shift += 7)
            {
                if (at >= to) throw new PeftSharpInputException($"truncated varint at byte {at}");
                byte x = b[at++];
                v |= (ulong)(x & 0x7f) << shift;
                if ((x & 0x80) == 0) return v;
            }

            throw new PeftSharpInputException($"varint longer than 10 bytes before byte {at}");
        }
    }
}
