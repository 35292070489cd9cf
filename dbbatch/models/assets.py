"""What dbbatch ships as package data: the CLIP tokenizers and the pretrained toy models' weights (assets/)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from dbbatch.core.errors import ModelError

TOKENIZER_DIR = Path(__file__).parent.parent / "assets" / "tokenizer"

# SDXL's second tokenizer: the same vocabulary and merges (read from TOKENIZER_DIR), its own special tokens
# (padding with "!", as SDXL 1.0's tokenizer_2 does); only its two config files are shipped.
TOKENIZER_2_DIR = Path(__file__).parent.parent / "assets" / "tokenizer_2"
ASSETS_DIR = Path(__file__).parent.parent / "assets"

# Built-in models with trained weights (scripts/pretrain_toy.py), shipped as package data: a diffusers folder
# without its tokenizer (the shared one in assets/tokenizer/ is copied in when the folder is written out).
PRETRAINED: dict[str, Path] = {"toy-sd": ASSETS_DIR / "toy-sd"}
PRETRAINED_CLIP: dict[str, Path] = {"toy-clip": ASSETS_DIR / "toy-clip"}  # transformers CLIPModel folders
WEIGHT_SUMS = "SHA256SUMS"  # beside the shipped weights: `sha256sum -c` format, checked by the tests


def load_shipped_tokenizer(name: str = "tokenizer") -> Any:
    """The CLIP tokenizer shipped with dbbatch ("tokenizer"), SDXL's second one ("tokenizer_2"), or the T5
    tokenizer of the FLUX.1-shaped built-ins ("tokenizer_t5", made by scripts/make_t5_tokenizer.py)."""
    from transformers import CLIPTokenizer

    if name == "tokenizer_t5":
        from transformers import T5TokenizerFast

        return T5TokenizerFast.from_pretrained(str(ASSETS_DIR / "tokenizer_t5"))
    if name == "tokenizer":
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    special = json.loads((TOKENIZER_2_DIR / "special_tokens_map.json").read_text())
    config = json.loads((TOKENIZER_2_DIR / "tokenizer_config.json").read_text())
    return CLIPTokenizer(vocab_file=str(TOKENIZER_DIR / "vocab.json"), merges_file=str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=config["model_max_length"], do_lower_case=config.get("do_lower_case", True),
                         **special)


def pretrained_digest(name: str) -> str:
    """sha256 over the shipped weight files of a pretrained built-in (16 hex digits): its identity."""
    folder = PRETRAINED[name]
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def write_pretrained(name: str, out_dir: Path) -> Path:
    """A pretrained built-in as a complete diffusers folder (the shipped files plus the shared tokenizer)."""
    src = PRETRAINED[name]
    if not (src / "model_index.json").is_file():
        raise ModelError(f"builtin:{name}: its weights are missing from this installation ({src}); reinstall dbbatch")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(WEIGHT_SUMS, "*.jsonl", "*.md"))
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_builtin_clip(name: str = "toy-clip") -> tuple[Any, Any, Any]:
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) of a pretrained built-in CLIP (`builtin:toy-clip`), eval
    mode, fp32: the stand-in for CLIP-I/CLIP-T on the toy world."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if name not in PRETRAINED_CLIP:
        raise ModelError(f"unknown built-in CLIP 'builtin:{name}'; available: {', '.join('builtin:' + a for a in PRETRAINED_CLIP)}")
    model = CLIPModel.from_pretrained(str(PRETRAINED_CLIP[name]), dtype=torch.float32)
    model.eval()
    folder = str(PRETRAINED_CLIP[name])
    return model, CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)), CLIPImageProcessor.from_pretrained(folder)
