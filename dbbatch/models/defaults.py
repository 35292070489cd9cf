"""The manifest completed by its base model: the training defaults a model carries (a built-in's metadata,
dbbatch_defaults.json beside a folder's model_index.json), filled in wherever the manifest sets nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dbbatch.config.manifest import Manifest
from dbbatch.config.parse import parse_manifest
from dbbatch.config.resolve import apply_model_defaults
from dbbatch.core.errors import ManifestError, ModelError
from dbbatch.models.assets import PRETRAINED
from dbbatch.models.loading import resolve_source

# Training defaults a model carries (a built-in in its asset folder, a user's folder beside model_index.json):
# SubjectSettings keys (resolution, train, priors, samples) that apply where the manifest is silent.
MODEL_DEFAULTS_FILE = "dbbatch_defaults.json"


def model_defaults(source: str, base_dir: Optional[Path]) -> tuple[dict[str, Any], Optional[str]]:
    """(the training defaults a base model carries, where they were read) or ({}, None) when it carries
    none or cannot be read without downloading (a remote folder or a hub id)."""
    kind, where = resolve_source(source, base_dir)
    if kind == "builtin":
        if where not in PRETRAINED:
            return {}, None
        path = PRETRAINED[where] / MODEL_DEFAULTS_FILE
    elif kind == "local":
        path = Path(where) / MODEL_DEFAULTS_FILE
    else:
        return {}, None
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model {source!r}: {path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ModelError(f"base_model {source!r}: {path} must hold a JSON object of manifest `defaults` keys")
    return data, str(path)


def with_model_defaults(m: Manifest, base_dir: Optional[Path]) -> Manifest:
    """`apply_model_defaults` with what the manifest's base model carries (a built-in's metadata, or
    dbbatch_defaults.json beside a local folder's model_index.json); unchanged when it carries nothing."""
    carried, path = model_defaults(m.base_model, base_dir)
    return apply_model_defaults(m, carried, f"model {m.base_model} ({path})") if carried else m


def load_manifest(path: Path) -> tuple[Manifest, Path]:
    """Read a manifest file; return it with the folder its relative paths resolve against."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"no such file (looked for {path.resolve()}); check the path"], str(path)) from None
    except UnicodeDecodeError:
        raise ManifestError(["the file is not UTF-8 text; a manifest is a YAML text file (is this a binary or another encoding?)"], str(path)) from None
    except OSError as e:
        raise ManifestError([f"cannot read the file: {e.strerror}; pass the manifest YAML file"], str(path)) from None
    base_dir = path.resolve().parent
    return with_model_defaults(parse_manifest(text, str(path)), base_dir), base_dir
