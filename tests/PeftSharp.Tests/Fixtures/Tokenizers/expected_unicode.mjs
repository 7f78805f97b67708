// Expected ids for tokenizer.json files with Unicode normalizers (NFC; NFKC then Lowercase) from Hugging Face
// transformers.js, on decomposed, composed and compatibility text. Run: NODE_PATH=<folder with @huggingface/transformers> node expected_unicode.mjs
import fs from "fs";
import { createRequire } from "module";
const require = createRequire(process.env.NODE_PATH + "/");
const { PreTrainedTokenizer } = require("@huggingface/transformers");
const texts = JSON.parse(fs.readFileSync("texts_unicode.json", "utf8"));
const out = {};
for (const dir of ["nfc_style", "nfkc_style"]) {
  const tj = JSON.parse(fs.readFileSync(dir + "/tokenizer.json", "utf8"));
  const tc = JSON.parse(fs.readFileSync(dir + "/tokenizer_config.json", "utf8"));
  const tok = new PreTrainedTokenizer(tj, tc);
  out[dir] = texts.map(t => {
    const ids = Array.from(tok.encode(t, { add_special_tokens: false }));
    return { text: t, ids, with_specials: Array.from(tok.encode(t)), decoded: ids.length ? tok.decode(ids, { skip_special_tokens: true }) : "" };
  });
}
fs.writeFileSync("expected_unicode.json", JSON.stringify(out, null, 0).replace(/\},\{/g, "},\n{"));
