#!/usr/bin/python3
"""Makes the tokenizer test fixtures with independent reference implementations (not PeftSharp's code):
SentencePiece models trained by Google's sentencepiece (Debian: python3-sentencepiece), and two byte-level BPE
tokenizer.json files trained here by a plain pair-counting loop. Expected ids for the .model files come from
sentencepiece itself; for the tokenizer.json files from Hugging Face transformers.js (expected_json.mjs).

Run from this folder:  /usr/bin/python3 make_fixtures.py && node expected_json.mjs
(transformers.js: npm install @huggingface/transformers in any folder, NODE_PATH pointing at its node_modules)."""
import collections, json, re
import sentencepiece as spm

corpus = []
words = ("the quick brown fox jumps over the lazy dog reverse copy sort add multiply lookup key value "
         "brackets match model adapter weight delta sparse prefix shared attention token train serve").split()
for i in range(400):
    w = [words[(i * 7 + j * 13) % len(words)] for j in range(6 + i % 5)]
    corpus.append(" ".join(w) + (" %d" % (i * 37 % 1000)) + (". " if i % 3 else "? ") + "café naïve")
with open("corpus.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(corpus) + "\n")

TEXTS = ["Hello world", "Ünïcode ☃ unknown to the unigram model", "reverse: abc -> cba", "  two leading spaces", "the quick brown fox", "naïve café",
         "中文 text", "emoji 🙂!", "", "a\nb\n\nc", "it's 12345 don't", "sparse  delta\tattention",
         "trainserve"]

cases = {}
for kind in ("bpe", "unigram"):
    # As Llama's tokenizer.model: no normalization rules, whitespace kept; BPE with byte fallback. The Unigram model
    # has no byte fallback (Microsoft.ML.Tokenizers 2.0.1 maps Unigram byte pieces to wrong ids; PeftSharp refuses it).
    spm.SentencePieceTrainer.train(input="corpus.txt", model_prefix="spm_" + kind, vocab_size=400 if kind == "bpe" else 120, model_type=kind,
                                   byte_fallback=(kind == "bpe"), character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file="spm_%s.model" % kind)
    cases["spm_%s.model" % kind] = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in TEXTS]
with open("expected_spm.json", "w", encoding="utf-8") as f:
    f.write(json.dumps(cases, ensure_ascii=False, separators=(",", ":")).replace("},{", "},\n{"))

# GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 upwards.
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
byte_char = {b: chr(c) for b, c in zip(bs, cs)}

def train_bpe(n_merges):
    words = collections.Counter()
    for line in corpus:
        for w in re.findall(r" ?[A-Za-zéï]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", line):
            words[tuple(byte_char[b] for b in w.encode("utf-8"))] += 1
    vocab = [byte_char[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs: break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b)); vocab.append(a + b)
        new = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b); i += 2
                else:
                    out.append(w[i]); i += 1
            new[tuple(out)] += c
        words = new
    return vocab, merges

vocab, merges = train_bpe(150)
specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]

def write_json(path, vocab, merges, pre_tokenizer, ignore_merges, merges_as_pairs, bos_by_template):
    v = {t: i for i, t in enumerate(vocab)}
    added = [{"id": len(vocab) + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, s in enumerate(specials)]
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": pre_tokenizer,
           "post_processor": {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": specials[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {specials[0]: {"id": specials[0], "ids": [len(vocab)], "tokens": [specials[0]]}}}
           if bos_by_template else {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": ignore_merges, "vocab": v,
                     "merges": [[a, b] for a, b in merges] if merges_as_pairs else ["%s %s" % m for m in merges]}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    with open(path.replace(".json", "_config.json"), "w", encoding="utf-8") as f:
        config = {"bos_token": specials[0], "eos_token": specials[1], "tokenizer_class": "PreTrainedTokenizerFast"}
        if not bos_by_template:
            config.update({"add_bos_token": False, "pad_token": specials[2]})
        json.dump(config, f, indent=1)

# GPT-2 style: the ByteLevel pre-tokenizer splits with its own regex.
write_json("gpt2_style/tokenizer.json", vocab, merges,
           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           ignore_merges=False, merges_as_pairs=False, bos_by_template=False)
# Llama-3 style: a Split regex, then ByteLevel without its regex; merges as pairs; ignore_merges, with one token
# ("Ġquickbrown") in the vocabulary that no merge builds, so ignore_merges changes the answer for " quickbrown".
llama3_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
write_json("llama3_style/tokenizer.json", vocab + ["Ġquickbrown"], merges,
           {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": llama3_split}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           ignore_merges=True, merges_as_pairs=True, bos_by_template=True)
# Added tokens with lstrip / rstrip (they absorb the whitespace on that side) and a non-special one (kept in decode).
write_json("added_tokens/tokenizer.json", vocab, merges,
           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           ignore_merges=False, merges_as_pairs=False, bos_by_template=False)
with open("added_tokens/tokenizer.json", encoding="utf-8") as f:
    doc = json.load(f)
doc["added_tokens"] += [
    {"id": len(vocab) + 3, "content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False, "special": True},
    {"id": len(vocab) + 4, "content": "[SEP]", "single_word": False, "lstrip": False, "rstrip": True, "normalized": False, "special": True},
    {"id": len(vocab) + 5, "content": "<tab>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False},
]
with open("added_tokens/tokenizer.json", "w", encoding="utf-8") as f:
    json.dump(doc, f, ensure_ascii=False, indent=1)

with open("texts.json", "w", encoding="utf-8") as f:
    json.dump(TEXTS + ["the quickbrown fox", "x<|end_of_text|>y", "fill   <mask> in  [SEP]   next", "a<tab>b <tab> c", "<mask><mask> [SEP][SEP] x"], f, ensure_ascii=False)
import os
for leftover in ("corpus.txt", "spm_bpe.vocab", "spm_unigram.vocab"):
    os.remove(leftover)
