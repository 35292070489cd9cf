"""Model families: what differs between diffusion model families, behind one small interface.

A family is one module here (`sd.py`, `sdxl.py`) with one `Family` subclass. It says which diffusers
components a model folder has and how they load, how prompts become the denoiser's conditioning, what the
training objective is, which diffusers pipeline renders priors and samples and writes the output folder, and
the family's LoRA and kohya specifics. Everything else (training, checkpoints, the priors cache, grids,
storage, packing, the worker) only calls these methods. A model folder's family is its `model_index.json`
`_class_name`; a built-in model names its own.

FLUX.1 (`flux.py`) is the third: a transformer denoiser (`Family.denoiser` names the component), packed latent
patches, a flow-matching objective and its own timestep draw, all behind the same methods. A new family
implements them in a new module and adds itself to FAMILIES: see `Family`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dbbatch.core.errors import ModelError
from dbbatch.models.families.base import Family
from dbbatch.models.families.flux import Flux
from dbbatch.models.families.sd import StableDiffusion
from dbbatch.models.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.pipeline_class: f for f in (StableDiffusion(), StableDiffusionXL(), Flux())}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}

__all__ = ["FAMILIES", "BY_NAME", "Family", "by_name", "inapplicable", "of_pipeline_class", "of_folder", "supported"]


def supported() -> str:
    return ", ".join(f"{f.pipeline_class} ({f.title})" for f in FAMILIES.values())


def by_name(name: str) -> Family:
    return BY_NAME[name]


def of_pipeline_class(class_name: Any, source: str) -> Family:
    """The family of a `model_index.json` `_class_name`; an unsupported one is one line naming it."""
    family = FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise ModelError(f"base_model {source!r}: its pipeline class {class_name!r} (model_index.json _class_name) is not "
                         f"supported; dbbatch trains {supported()}")
    return family


def of_index(index: Optional[dict[str, Any]], source: str) -> Family:
    if not isinstance(index, dict):
        raise ModelError(f"base_model {source!r}: model_index.json is not a JSON object")
    return of_pipeline_class(index.get("_class_name"), source)


def of_folder(folder: Path, source: str) -> Family:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model {source!r}: cannot read its model_index.json ({e})") from None
    return of_index(index, source)


def inapplicable(family: Family, settings: Any, prefix: str, source: str) -> list[str]:
    """One line per family section (`sdxl:`) that `settings` (a subject, its entry or `defaults`) sets but
    the base model's family does not read; each line starts `prefix` + the section ("subjects[0]." or
    "subject rex: ")."""
    out = []
    for other in FAMILIES.values():
        if other.section and other.section != family.section and getattr(settings, other.section, None) is not None:
            out.append(f"{prefix}{other.section}: applies to {other.title} base models only, but base_model {source} "
                       f"is {family.title} ({family.pipeline_class}); remove it")
    return out
