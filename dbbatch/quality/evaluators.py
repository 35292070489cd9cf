"""The embedding models evaluation scores with (`evaluation.clip`, `evaluation.dino`): found, checked, loaded.

A source is what `base_model` may be, for a transformers model: `builtin:toy-clip`, a local folder, an fsspec
URL (downloaded once into the cache) or a hub id. Models load once per process (the worker keeps them),
in eval mode with gradients off; they are never trained. `check` answers `dbbatch validate` in one line
without loading weights.

Features: CLIP images and texts through their projections (CLIP-I, CLIP-T, class drift); DINO from the CLS
token of a ViT or DINOv2 (the paper's ViT-S/16 DINO). A CLIPModel named as `dino` (how the toy world stands in
for DINO, having no self-supervised ViT of its own) gives its vision tower's last-layer patch tokens, flattened
in image order: a CLIP's pooled embedding is trained to match captions, and the toy world's captions name
colours, not layouts, so it barely tells a blue/yellow split square from a plain blue one (measured: the base
model and a trained subject 0.65 and 0.62-0.67 from the photos), while the patch tokens keep where each colour
is, as DINO's features keep what the subject looks like (0.05 and 0.38-0.47; docs/toy-world.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dbbatch.core.errors import DbbatchError, ModelError
from dbbatch.store.locations import redact

log = logging.getLogger(__name__)

KINDS = {"clip": ("clip",), "dino": ("vit", "dinov2", "clip")}  # evaluation key -> model_type it accepts
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@dataclass
class Embedder:
    """One loaded model: `images` -> one row per image; `texts` (CLIP only) -> one row per prompt."""

    source: str
    kind: str  # clip | dino
    model: Any
    processor: Any
    tokenizer: Any = None

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def images(self, images: list[Any], batch_size: int = 32) -> np.ndarray:
        import torch

        rows = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=images[start : start + batch_size], return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
            with torch.no_grad():
                if self.model.config.model_type == "clip":
                    vision = self.model.vision_model(pixel_values=pixels)
                    if self.kind == "clip":
                        features = self.model.visual_projection(vision.pooler_output)
                    else:  # a CLIP standing in for DINO: its patch tokens, in image order (see the module's doc)
                        features = vision.last_hidden_state[:, 1:].flatten(1)
                else:
                    features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            rows.append(features.float().cpu().numpy())
        return np.concatenate(rows).astype(np.float64)

    def texts(self, prompts: list[str]) -> np.ndarray:
        import torch

        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt")
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tok.input_ids.to(self.device)).pooler_output
            return self.model.text_projection(pooled).float().cpu().numpy().astype(np.float64)


def _folder_of(source: str, field: str, base_dir: Optional[Path], cache_dir: Path, storage: Any) -> tuple[Path, Optional[Path]]:
    """(model folder, tokenizer folder or None: the model folder's own) for a source."""
    from dbbatch.models.assets import PRETRAINED_CLIP, TOKENIZER_DIR
    from dbbatch.models.loading import cache_lock, fetch_remote_folder, resolve_source

    kind, where = resolve_source(source, base_dir)
    if kind == "builtin":
        if where not in PRETRAINED_CLIP:
            raise ModelError(f"{field}: {_unknown_builtin(source)}")
        return PRETRAINED_CLIP[where], TOKENIZER_DIR
    if kind == "local":
        return Path(where), None
    if kind == "remote":
        with cache_lock(cache_dir / "models" / "remote"):
            return fetch_remote_folder(where, cache_dir, storage, marker="config.json", field=field), None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where, allow_patterns=["*.json", "*.txt", "*.safetensors"])), None
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear error
        raise ModelError(f"{field} {redact(source)!r}: not a local folder, and the hub could not provide it ({type(e).__name__})") from None


def config_problem(config: Any, key: str) -> Optional[str]:
    """Why a model with this config.json cannot serve evaluation.<key>, or None."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    accepted = KINDS[key]
    if model_type not in accepted:
        want = "a CLIPModel" if key == "clip" else "a ViT or DINOv2 (or a CLIPModel)"
        found = f"a {model_type!r} model" if model_type else "a model of no known type"
        return f"{found} (config.json model_type), but {key} needs {want}"
    return None


def _unknown_builtin(source: str) -> str:
    from dbbatch.config.manifest_errors import closest
    from dbbatch.models.assets import PRETRAINED_CLIP

    names = [f"builtin:{n}" for n in PRETRAINED_CLIP]
    close = closest(source, names)
    return f"unknown built-in evaluation model {redact(source)!r}; available: {', '.join(names)}" + (f"; did you mean {close!r}?" if close else "")


def check(source: str, key: str, base_dir: Optional[Path], storage: Any, check_remote: bool) -> Optional[str]:
    """Why `source` cannot serve as evaluation.<key>, in one line starting with the source (None: it can, or it
    cannot be checked without a download: a hub id, a remote folder with check_remote off). Reads config.json
    and the folder's listing, no weights."""
    from dbbatch.models.assets import PRETRAINED_CLIP
    from dbbatch.models.loading import resolve_source
    from dbbatch.store.locations import join

    kind, where = resolve_source(source, base_dir)
    if kind == "builtin":
        return None if where in PRETRAINED_CLIP else _unknown_builtin(source)
    if kind == "hub" or (kind == "remote" and not check_remote):
        return None
    shown = repr(redact(source))
    try:
        if kind == "local":
            folder = Path(where)
            if not folder.is_dir():
                return f"{shown}: no such folder ({folder}); give a transformers model folder, an fsspec URL or a hub id"
            names = {p.name for p in folder.iterdir()}
            config = json.loads((folder / "config.json").read_text()) if "config.json" in names else None
        else:
            names = {f.rel for f in storage.list_tree(where)}
            config = storage.read_json(join(where, "config.json")) if "config.json" in names else None
    except (OSError, ValueError, DbbatchError) as e:
        return f"{shown}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if config is None:
        return f"{shown}: not a transformers model folder (no config.json); save one with save_pretrained"
    if problem := config_problem(config, key):
        return f"{shown}: {problem}"
    if not names & set(WEIGHT_FILES):
        return f"{shown}: no weights in it (looked for {', '.join(WEIGHT_FILES[:2])})"
    if "preprocessor_config.json" not in names:
        return f"{shown}: no preprocessor_config.json (the image processor) in it; save the processor beside the model"
    if key == "clip" and not names & {"tokenizer.json", "vocab.json", "tokenizer_config.json"}:
        return f"{shown}: no tokenizer in it (clip_t needs the CLIP tokenizer); save it beside the model"
    return None


def load(source: str, key: str, base_dir: Optional[Path], cache_dir: Path, storage: Any) -> Embedder:
    """Load `source` as evaluation.<key>: eval mode, no gradients, fp32, on the GPU when there is one."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    field = f"evaluation.{key}"
    folder, tokenizer_dir = _folder_of(source, field, base_dir, cache_dir, storage)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{field} {redact(source)!r}: cannot read its config.json in {folder} ({e})") from None
    if problem := config_problem(config, key):
        raise ModelError(f"{field} {redact(source)!r}: {problem}")
    try:
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        processor = AutoImageProcessor.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or folder)) if key == "clip" else None
    except Exception as e:  # noqa: BLE001 - a broken folder is one clear line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{field} {redact(source)!r}: cannot be loaded from {folder} ({type(e).__name__}: {first})") from None
    model.eval().requires_grad_(False)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    log.info("evaluation model %s (%s) loaded from %s", redact(source), key, folder)
    return Embedder(source, key, model, processor, tokenizer)
