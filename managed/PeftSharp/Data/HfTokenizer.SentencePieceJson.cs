using System.Text;
using System.Text.Json.Nodes;
using PeftSharp.Formats;

namespace PeftSharp.Data;

public sealed partial class HfTokenizer
{
    /// <summary>
    /// A tokenizer.json that is a SentencePiece model converted by Hugging Face (Llama 2, Mistral, Gemma folders that
    /// ship no tokenizer.model): BPE over characters with "▁" for spaces, byte fallback to &lt;0xNN&gt; pieces,
    /// either the legacy normalizer (Prepend "▁", Replace " " by "▁") or a Metaspace pre-tokenizer.
    /// </summary>
    private static bool IsSentencePieceStyleBpe(JsonObject doc)
    {
        var model = doc["model"] as JsonObject;
        if (model?["type"]?.Value<string>() != "BPE") return false;
        return model["byte_fallback"] is JsonValue bf && bf.GetValueKind() == System.Text.Json.JsonValueKind.True
            || Mentions(doc["pre_tokenizer"], "Metaspace") || Mentions(doc["normalizer"], "Prepend");
    }

    /// <summary>
    /// Hugging Face's BPE as tokenizers runs it for these files: each segment (between added tokens) normalized, split
    /// by the Metaspace pre-tokenizer if there is one, each piece split into characters (a character missing from the
    /// vocabulary becomes its UTF-8 bytes as &lt;0xNN&gt; pieces with byte_fallback, else unk_token, consecutive unknowns
    /// fused with fuse_unk), then merged pair by pair, the lowest merge rank first and the leftmost among equals.
    /// Decoding maps &lt;0xNN&gt; pieces back to bytes, "▁" to spaces, and drops the first leading space as the
    /// files' Strip / Metaspace decoders do.
    /// </summary>
    private static HfTokenizer FromSentencePieceStyleJson(string path, JsonObject doc, JsonObject? config)
    {
        var model = (JsonObject)doc["model"]!;
        var vocab = BpeVocabulary(path, model);
        var tokens = new Dictionary<int, string>(vocab.Count);
        foreach (var (token, id) in vocab) tokens[id] = token;
        if (model["dropout"] is JsonValue dropout && dropout.GetValueKind() == System.Text.Json.JsonValueKind.Number && dropout.Value<double>() != 0)
        {
            throw new NotSupportedException($"{path}: BPE dropout is a training-time option; set model.dropout to null");
        }

        if (model["continuing_subword_prefix"] is JsonValue cp && cp.GetValueKind() == System.Text.Json.JsonValueKind.String && cp.Value<string>().Length > 0
            || model["end_of_word_suffix"] is JsonValue ew && ew.GetValueKind() == System.Text.Json.JsonValueKind.String && ew.Value<string>().Length > 0)
        {
            throw new NotSupportedException($"{path}: continuing_subword_prefix / end_of_word_suffix are not supported");
        }

        if (model["ignore_merges"] is JsonValue im && im.Value<bool>()) throw new NotSupportedException($"{path}: ignore_merges with a SentencePiece-style BPE is not supported");
        bool byteFallback = model["byte_fallback"] is JsonValue bf && bf.GetValueKind() == System.Text.Json.JsonValueKind.True;
        bool fuseUnk = model["fuse_unk"] is JsonValue fu && fu.GetValueKind() == System.Text.Json.JsonValueKind.True;
        int? unk = model["unk_token"] is JsonValue ut && ut.GetValueKind() == System.Text.Json.JsonValueKind.String
            ? vocab.TryGetValue(ut.Value<string>(), out int u) ? u : throw new PeftSharpInputException($"{path}: unk_token '{ut.Value<string>()}' is not in the vocabulary")
            : null;

        // (left id, right id) -> (rank, merged id).
        var merges = new Dictionary<(int, int), (int Rank, int Id)>();
        var mergeList = BpeMerges(path, model);
        for (int rank = 0; rank < mergeList.Count; rank++)
        {
            int sp = mergeList[rank].IndexOf(' ');
            if (sp <= 0) throw new PeftSharpInputException($"{path}: model.merges[{rank}] is neither \"a b\" nor [\"a\", \"b\"]");
            string a = mergeList[rank][..sp], b = mergeList[rank][(sp + 1)..];
            if (vocab.TryGetValue(a, out int ia) && vocab.TryGetValue(b, out int ib) && vocab.TryGetValue(a + b, out int merged)) merges.TryAdd((ia, ib), (rank, merged));
        }

        var normalize = Normalizer(path, doc["normalizer"]);
        var split = MetaspaceOf(path, doc["pre_tokenizer"]);
        var added = AddedTokens(path, doc);
        var byteIds = new int[256];
        for (int b = 0; b < 256; b++) byteIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out int id) ? id : -1;

        List<int> Word(string piece)
        {
            var symbols = new List<int>();
            bool lastUnknown = false;
            Span<byte> utf8 = stackalloc byte[4];
            foreach (var rune in piece.EnumerateRunes())
            {
                if (vocab.TryGetValue(rune.ToString(), out int id))
                {
                    symbols.Add(id);
                    lastUnknown = false;
                    continue;
                }

                int n = rune.EncodeToUtf8(utf8);
                bool bytesKnown = byteFallback;
                for (int i = 0; i < n && bytesKnown; i++) bytesKnown = byteIds[utf8[i]] >= 0;
                if (bytesKnown)
                {
                    for (int i = 0; i < n; i++) symbols.Add(byteIds[utf8[i]]);
                    lastUnknown = false;
                    continue;
                }

                int unknown = unk ?? throw new PeftSharpInputException($"{path}: '{rune}' is not in the vocabulary and the model has no unk_token (or byte pieces)");
                if (!(fuseUnk && lastUnknown)) symbols.Add(unknown);
                lastUnknown = true;
            }

            // Merge the pair of lowest rank (the leftmost of equal ranks) until none is left.
            while (symbols.Count > 1)
            {
                int best = -1, bestRank = int.MaxValue, bestId = 0;
                for (int i = 0; i + 1 < symbols.Count; i++)
                {
                    if (merges.TryGetValue((symbols[i], symbols[i + 1]), out var m) && m.Rank < bestRank)
                    {
                        best = i;
                        bestRank = m.Rank;
                        bestId = m.Id;
                    }
                }

                if (best < 0) break;
                symbols[best] = bestId;
                symbols.RemoveAt(best + 1);
            }

            return symbols;
        }

        List<int> EncodeSegment(string segment, bool atStart)
        {
            var ids = new List<int>();
            foreach (var piece in split(normalize(segment), atStart))
            {
                if (piece.Length > 0) ids.AddRange(Word(piece));
            }

            return ids;
        }

        bool stripLeading = Mentions(doc["decoder"], "Strip") || Mentions(doc["decoder"], "Metaspace");
        string Decode(IReadOnlyList<int> run)
        {
            var bytes = new List<byte>();
            foreach (int id in run)
            {
                if (!tokens.TryGetValue(id, out var token)) continue;
                if (token.Length == 6 && token.StartsWith("<0x", StringComparison.Ordinal) && token[5] == '>'
                    && byte.TryParse(token.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out byte value))
                {
                    bytes.Add(value);
                    continue;
                }

                if (unk == id) continue;
                bytes.AddRange(Encoding.UTF8.GetBytes(token.Replace('\u2581', ' ')));
            }

            string text = Encoding.UTF8.GetString(bytes.ToArray()); // invalid byte runs become U+FFFD, as the ByteFallback decoder writes them
            return stripLeading && text.StartsWith(' ') ? text[1..] : text;
        }

        var tok = new HfTokenizer($"{JsonFile} (SentencePiece-style BPE{(byteFallback ? " with byte fallback" : "")}, {vocab.Count} tokens)", vocab.Values.Max() + 1, EncodeSegment,
            Decode, added);
        tok.ResolveSpecials(path, config, doc, vocab);
        return tok;
    }

    /// <summary>
    /// The Metaspace pre-tokenizer (or none): spaces become the replacement ("▁"), which is prepended per
    /// prepend_scheme ("always", "first": only where the text starts, "never"; older files' add_prefix_space), and with
    /// split the text is cut before each replacement character.
    /// </summary>
    private static Func<string, bool, IEnumerable<string>> MetaspaceOf(string path, JsonNode? node)
    {
        if (node is null) return (s, _) => new[] { s };
        if (node is JsonObject seq && seq["type"]?.Value<string>() == "Sequence" && seq["pretokenizers"] is JsonArray { Count: 1 } one) node = one[0];
        if (node is not JsonObject o || o["type"]?.Value<string>() != "Metaspace")
        {
            throw new NotSupportedException($"{path}: pre_tokenizer {node?.ToJsonString()} with a SentencePiece-style BPE is not supported (none or Metaspace)");
        }

        string replacement = o["replacement"]?.Value<string>() ?? "\u2581";
        if (replacement.Length != 1) throw new NotSupportedException($"{path}: Metaspace replacement '{replacement}' is not one character");
        char mark = replacement[0];
        string scheme = o["prepend_scheme"]?.Value<string>() ?? (o["add_prefix_space"] is JsonValue ap && !ap.Value<bool>() ? "never" : "always");
        if (scheme is not ("always" or "first" or "never")) throw new NotSupportedException($"{path}: Metaspace prepend_scheme '{scheme}' is not supported");
        bool split = o["split"] is not JsonValue sv || sv.Value<bool>();
        return (s, atStart) =>
        {
            s = s.Replace(' ', mark);
            if ((scheme == "always" || (scheme == "first" && atStart)) && s.Length > 0 && s[0] != mark) s = mark + s;
            if (!split) return new[] { s };
            var pieces = new List<string>();
            int start = 0;
            for (int i = 1; i < s.Length; i++)
            {
                if (s[i] != mark) continue;
                pieces.Add(s[start..i]);
                start = i;
            }

            if (s.Length > 0) pieces.Add(s[start..]);
            return pieces;
        };
    }
}
