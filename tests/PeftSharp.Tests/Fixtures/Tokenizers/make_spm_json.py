# Writes two SentencePiece-style BPE tokenizer.json fixtures (as Hugging Face converts Llama 2 / Mistral models):
# spm_json_legacy (normalizer Prepend + Replace, no pre-tokenizer, decoder Replace/ByteFallback/Fuse/Strip) and
# spm_json_metaspace (Metaspace pre-tokenizer, prepend_scheme "first", split false). The vocabulary is <unk>, <s>, </s>,
# the 256 byte pieces <0x00>..<0xFF>, single characters and pieces from a tiny BPE training run on CORPUS below.
# Expected ids come from transformers.js: expected_json.mjs spm_json. Run: python3 make_spm_json.py
import json, os, collections

CORPUS = ("the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs. "
          "sparse deltas and low rank adapters share one base model. attention with shared prefixes. "
          "def main(): return 42 if x else y") * 3
chars = sorted(set(CORPUS.replace(" ", "\u2581")) | {"\u2581"})
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for b in range(256):
    vocab[f"<0x{b:02X}>"] = len(vocab)
for c in chars:
    vocab.setdefault(c, len(vocab))
words = collections.Counter(("\u2581" + w) for w in CORPUS.split(" ") if w)
seqs = {w: list(w) for w in words}
merges = []
for _ in range(120):
    pairs = collections.Counter()
    for w, n in words.items():
        s = seqs[w]
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += n
    if not pairs:
        break
    (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
    merges.append([a, b])
    vocab.setdefault(a + b, len(vocab))
    for w in seqs:
        s, out, i = seqs[w], [], 0
        while i < len(s):
            if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                out.append(a + b); i += 2
            else:
                out.append(s[i]); i += 1
        seqs[w] = out

def added(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}

base = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": True, "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
}
legacy = dict(base, normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
              pre_tokenizer=None,
              decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
                                                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
meta = dict(base, normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
            decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
                                                      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
          "tokenizer_class": "LlamaTokenizerFast", "legacy": True}
for name, doc in [("spm_json_legacy", legacy), ("spm_json_metaspace", meta)]:
    os.makedirs(name, exist_ok=True)
    json.dump(doc, open(f"{name}/tokenizer.json", "w"), ensure_ascii=False, indent=1)
    json.dump(config, open(f"{name}/tokenizer_config.json", "w"), indent=1)
json.dump(["the quick brown fox", "  two leading spaces", "sparse  deltas\tand tabs", "naïve café 中文 🙂!", "def main(): return 42",
           "the lazy dog. the fox", "unknown QZX letters", "", "a\nb", "trailing space "], open("texts_spm_json.json", "w"), ensure_ascii=True)
