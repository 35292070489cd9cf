"""Sweeps: one subject tried over a grid of settings, each combination a subject of its own (a variant).

Pure: `expand` turns a subject's raw mapping and its `sweep:` into one raw mapping per combination (the swept
values set at their dotted paths) and a stable, readable variant id; the manifest validates each like any
subject. A variant id is `<id>~<name>=<value>,<name>=<value>` in the order the sweep names its settings:

    rex + {train.learning_rate: [1.0e-4, 5.0e-5], train.lora.rank: [4, 16]}
      -> rex~lr=1e-4,rank=4  rex~lr=1e-4,rank=16  rex~lr=5e-5,rank=4  rex~lr=5e-5,rank=16

`<name>` is the setting's last path segment (a few long ones shortened: SHORT_NAMES), or the whole dotted path
when two swept settings share that segment. A value is written as YAML would read it back (1e-4, 16, true,
cosine); a string value that is not already `[a-z0-9._-]` (a prompt), or values that would read alike, are
written as a digest of the value (`instance_prompt=h3fa2c1`), so a variant keeps its id when values are added. A variant id is a valid folder name on POSIX, Windows and object stores, and a user
id can never equal one: `~` is refused in ids.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from typing import Any, Iterable, Optional

# Keys a sweep cannot vary: what names the subject and its photos (a variant is the same subject).
UNSWEEPABLE = {"id": "it names the subject (each variant gets its own id)", "token": "it names the subject in its prompts",
               "class_noun": "it names the subject's class (sweep class_prompt or priors instead)",
               "images": "it names the subject's photos (a sweep compares settings on the same photos)",
               "sweep": "a sweep cannot sweep itself"}
SHORT_NAMES = {"learning_rate": "lr", "text_encoder_learning_rate": "te_lr", "max_steps": "steps",
               "prior_loss_weight": "prior_weight", "gradient_accumulation": "accum", "num_images": "priors",
               "with_prior_preservation": "prior", "train_text_encoder": "te", "guidance_scale": "cfg"}
MAX_VARIANTS = 64
MAX_VARIANT_ID = 128
SEPARATOR = "~"
_PLAIN = re.compile(r"^[a-z0-9._-]{1,24}$")
VARIANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}~[a-z0-9._=,-]+$")  # what `variant_id` makes, nothing else


def format_value(v: Any) -> str:
    """A swept value as the variant id shows it: 1e-4, 3e-3, 0.05, 16, true, null, cosine."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v).lower()
        if abs(v) < 1e-2 or abs(v) >= 1e5:  # learning rates read as written: 3e-3, 5e-5
            mantissa, exponent = f"{v:.6e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{v:.6g}"
    return str(v)


def short_names(paths: Iterable[str]) -> dict[str, str]:
    """Each swept path's name in the variant id: its short last segment, or the full path where two collide."""
    paths = list(paths)
    short = {p: SHORT_NAMES.get(p.rsplit(".", 1)[-1], p.rsplit(".", 1)[-1]) for p in paths}
    counts: dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {p: (name if counts[name] == 1 else p) for p, name in short.items()}


def value_labels(values: list[Any]) -> list[str]:
    """How each value of one swept setting shows in ids: formatted, or, for a value that is not a plain name (a
    prompt) or would read like another (1e-4 and 1.00000001e-4), `h` and 6 hex digits of the value's digest: a
    label of the value alone, so adding or reordering prompts never renames a variant."""
    labels = [format_value(v) for v in values]
    return [x if _PLAIN.match(x) and labels.count(x) == 1 else "h" + hashlib.sha256(json.dumps(v).encode()).hexdigest()[:6]
            for x, v in zip(labels, values)]


def variant_id(subject_id: str, names: list[str], labels: list[str]) -> str:
    return subject_id + SEPARATOR + ",".join(f"{n}={x}" for n, x in zip(names, labels))


def is_variant_id(v: str) -> bool:
    return SEPARATOR in v


def valid_variant_id(v: str) -> bool:
    """Whether `v` has the form of a variant id (a stored name read back: it becomes a path segment again)."""
    return len(v) <= MAX_VARIANT_ID and VARIANT_ID_RE.match(v) is not None


def count(sweep: dict[str, list[Any]]) -> int:
    return math.prod(len(v) for v in sweep.values()) if sweep else 0


def set_path(mapping: dict[str, Any], path: str, value: Any) -> None:
    """mapping[a][b][c] = value for path a.b.c, creating the sections on the way (a copy is the caller's)."""
    *sections, key = path.split(".")
    for name in sections:
        inner = mapping.get(name)
        if not isinstance(inner, dict):
            inner = mapping[name] = {}
        mapping = inner
    mapping[key] = value


def expand(raw: dict[str, Any], sweep: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(variant id, {path: value}, the variant's raw subject mapping) for every combination of `sweep`, in the
    order of the sweep's keys and values (the last key varies fastest). The raw mappings have no `sweep` and
    keep the subject's id (the caller validates them as the subject and then names them)."""
    paths = list(sweep)
    names = [short_names(paths)[p] for p in paths]
    labels = [value_labels(list(sweep[p])) for p in paths]
    out = []
    for combo in itertools.product(*(range(len(sweep[p])) for p in paths)):
        values = {p: sweep[p][i] for p, i in zip(paths, combo)}
        variant = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
        for p, v in values.items():
            set_path(variant, p, copy.deepcopy(v))
        out.append((variant_id(str(raw.get("id")), names, [labels[k][i] for k, i in enumerate(combo)]), values, variant))
    return out


def sweep_problem(path: str, known: Iterable[str]) -> Optional[str]:
    """Why `path` cannot be swept, or None. `known`: every dotted setting path a subject may set."""
    from dbbatch.config.manifest_errors import closest

    if path in UNSWEEPABLE:
        return f"{path!r} cannot be swept: {UNSWEEPABLE[path]}"
    known = list(known)
    if path not in known:
        close = closest(path, known)
        return f"unknown setting {path!r}" + (f"; did you mean {close!r}?" if close else "") + \
            " (a dotted path such as train.learning_rate or train.lora.rank)"
    return None
