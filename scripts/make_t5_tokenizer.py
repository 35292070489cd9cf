"""Rebuild dbbatch/assets/tokenizer_t5/ (the T5 tokenizer of the built-in FLUX.1-shaped models).

FLUX.1's second text encoder is a T5 v1.1 XXL encoder with a 32,100-piece SentencePiece Unigram tokenizer;
its vocabulary cannot be downloaded here, so dbbatch makes a small one in the same format: a `tokenizers`
Unigram model (`<pad>` 0, `</s>` 1, `<unk>` 2, as T5's), with T5's normaliser and Metaspace pre-tokeniser,
saved as a `T5TokenizerFast` folder that `FluxPipeline.from_pretrained` loads. Its pieces are every printable
ASCII character (alone and word-initial), and whole words: the CLIP vocabulary's common words (the shipped
tokenizer/vocab.json, first 2,000 word pieces), scored by their CLIP rank so frequent words win. No training
and no randomness: the same files every time.

    python scripts/make_t5_tokenizer.py
"""

import json
import math
import string
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "dbbatch" / "assets"
OUT = ASSETS / "tokenizer_t5"
WORDS = 2000
MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 model_max_length


def pieces() -> list[tuple[str, float]]:
    vocab = json.loads((ASSETS / "tokenizer" / "vocab.json").read_text())
    words = []
    for piece, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece.endswith("</w>") and piece[:-4].isalpha() and piece[:-4].isascii() and len(piece) > 5:
            words.append(piece[:-4])
        if len(words) == WORDS:
            break
    out = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = [c for c in string.printable if c.strip()]
    out += [(c, -12.0) for c in chars] + [("\u2581" + c, -11.0) for c in chars]
    seen = {p for p, _ in out}
    for i, w in enumerate(words):  # a whole word scores above any split into characters
        if "\u2581" + w not in seen:
            seen.add("\u2581" + w)
            out.append(("\u2581" + w, -3.0 - math.log1p(i)))
    return out


def main() -> None:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    tok = Tokenizer(Unigram(pieces(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                         model_max_length=MAX_LENGTH)
    OUT.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(str(OUT))
    print(f"wrote {OUT} ({len(t5)} pieces)")


if __name__ == "__main__":
    main()
