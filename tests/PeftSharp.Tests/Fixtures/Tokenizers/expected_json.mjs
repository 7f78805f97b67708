// Expected ids for the tokenizer.json fixtures from Hugging Face transformers.js (an implementation independent of
// PeftSharp and of Microsoft.ML.Tokenizers). Run: NODE_PATH=<folder with @huggingface/transformers> node expected_json.mjs [SET]
// SET: json (byte-level BPE fixtures, the default), unicode (NFC; NFKC then Lowercase normalizers on decomposed,
// composed and compatibility text), spm_json (SentencePiece-style BPE from make_spm_json.py: byte fallback, the legacy
// Prepend/Replace normalizer or Metaspace).
import fs from "fs";
import { createRequire } from "module";
const require = createRequire(process.env.NODE_PATH + "/");
const { PreTrainedTokenizer } = require("@huggingface/transformers");
const sets = {
  json: { texts: "texts.json", dirs: ["gpt2_style", "llama3_style", "added_tokens"], out: "expected_json.json" },
  unicode: { texts: "texts_unicode.json", dirs: ["nfc_style", "nfkc_style"], out: "expected_unicode.json" },
  spm_json: { texts: "texts_spm_json.json", dirs: ["spm_json_legacy", "spm_json_metaspace"], out: "expected_spm_json.json" },
};
const set = sets[process.argv[2] ?? "json"];
const texts = JSON.parse(fs.readFileSync(set.texts, "utf8"));
const out = {};
for (const dir of set.dirs) {
  const tj = JSON.parse(fs.readFileSync(dir + "/tokenizer.json", "utf8"));
  const tc = JSON.parse(fs.readFileSync(dir + "/tokenizer_config.json", "utf8"));
  const tok = new PreTrainedTokenizer(tj, tc);
  out[dir] = texts.map(t => {
    const ids = Array.from(tok.encode(t, { add_special_tokens: false }));
    return { text: t, ids, with_specials: Array.from(tok.encode(t)), decoded: ids.length ? tok.decode(ids, { skip_special_tokens: true }) : "" };
  });
}
fs.writeFileSync(set.out, JSON.stringify(out, null, 0).replace(/\},\{/g, "},\n{"));
