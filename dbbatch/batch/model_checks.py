"""Checks against the base model, read from its config files without loading weights: tokens against its
tokenizer, its family, the UNet layers LoRA targets name, the evaluation models.

Token rules (CLIP BPE merges are ordered by frequency, so a token's id is its frequency rank):
- a token that is one BPE piece with id < COMMON_WORD_MAX_ID is a common word: an error, since
  fine-tuning would overwrite what the model knows it as (the DreamBooth paper's reason for rare tokens);
- a token that splits into several pieces is allowed but warned, naming the pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dbbatch.config.manifest import Manifest, source_of, where_of
from dbbatch.config.manifest_errors import did_you_mean
from dbbatch.config.resolve import resolve_subjects
from dbbatch.core.errors import DbbatchError, ModelError

COMMON_WORD_MAX_ID = 10000


def token_problems(manifest: Manifest, tokenizer: Any) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for i, s in enumerate(manifest.subjects):
        if s.token.casefold() == s.class_noun.casefold():
            continue  # reported by the manifest's own checks, once
        pieces = tokenizer.tokenize(s.token)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        where = f"{source_of(manifest, i)}.token"
        if len(pieces) == 1 and ids[0] < COMMON_WORD_MAX_ID:
            problems.append(
                f"{where}: {s.token!r} is a common word (CLIP token #{ids[0]}); fine-tuning would overwrite its meaning. "
                "Pick a rare token such as 'sks' or 'ohwx'"
            )
        elif len(pieces) > 1:
            shown = " + ".join(p.replace("</w>", "") for p in pieces)
            warnings.append(f"{where}: {s.token!r} splits into {len(pieces)} tokens ({shown}); a single rare token such as 'sks' binds better")
    return problems, warnings


def _read_config(kind: str, where: str, rel: str, storage: Any, check_remote: bool) -> Optional[dict[str, Any]]:
    """A JSON file of the base model's folder (configs only, never weights), or None when not reachable."""
    if kind == "local":
        path = Path(where) / rel
        return json.loads(path.read_text()) if path.is_file() else None
    if kind == "remote" and check_remote:
        from dbbatch.store.locations import join

        return storage.read_json(join(where, rel))
    return None


def component_config(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool,
                     component: str) -> Optional[dict[str, Any]]:
    """A component's config (`vae`, `unet`, `transformer`: its config.json; a built-in's from ARCHS), or None when
    not reachable here or unreadable (load_tokenizer/check_folder report an unusable folder)."""
    from dbbatch.models.assets import PRETRAINED
    from dbbatch.models.builtin import ARCHS
    from dbbatch.models.loading import resolve_source

    kind, where = resolve_source(base_model, base_dir)
    if kind == "builtin" and where in PRETRAINED:
        kind, where = "local", str(PRETRAINED[where])  # its configs are package data
    if kind == "builtin":
        return dict(ARCHS[where][component]) if where in ARCHS and component in ARCHS[where] else None
    try:
        config = _read_config(kind, where, f"{component}/config.json", storage, check_remote)
    except (OSError, ValueError, DbbatchError):
        return None
    return config if isinstance(config, dict) else None


def model_geometry(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool,
                   family: Any = None) -> Optional[tuple[int, int, int]]:
    """(VAE scale factor, native resolution, latent patch side) from the model's config files (`family`: its
    family, when known), or None when unknown here."""
    from dbbatch.models import families
    from dbbatch.models.base import vae_scale_factor

    family = family or families.by_name("sd")
    vae = component_config(base_model, base_dir, storage, check_remote, "vae")
    denoiser = denoiser_config(base_model, base_dir, storage, check_remote, family)
    if not vae or not denoiser or "block_out_channels" not in vae:
        return None
    return vae_scale_factor(vae), family.native_resolution(denoiser, vae), family.latent_patch


def load_tokenizer(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool) -> Optional[Any]:
    """The tokenizer only (no weights), or None when it would need the network and that is off."""
    from transformers import CLIPTokenizer

    from dbbatch.models.assets import TOKENIZER_DIR
    from dbbatch.models.loading import check_folder, resolve_source

    kind, where = resolve_source(base_model, base_dir)
    if kind == "builtin":
        from dbbatch.models.builtin import builtin_names, unknown_builtin

        if where not in builtin_names():
            raise unknown_builtin(where)
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))  # every built-in uses the shipped tokenizer
    if kind == "local":
        check_folder(Path(where), base_model)
        return _tokenizer_from(Path(where) / "tokenizer", base_model)
    if kind == "remote" and check_remote:
        import tempfile

        from dbbatch.store.locations import join

        if not storage.exists(join(where, "model_index.json")):
            raise ModelError(f"base_model {base_model!r}: not a diffusers folder (no model_index.json there); "
                             "point it at a folder saved with save_pretrained")
        with tempfile.TemporaryDirectory(prefix="dbbatch-tok-") as tmp:
            storage.fetch_tree(join(where, "tokenizer"), Path(tmp))
            return _tokenizer_from(Path(tmp), base_model)
    return None


def _tokenizer_from(folder: Path, base_model: str) -> Any:
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken folder
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(f"base_model {base_model!r}: the tokenizer in {folder} cannot be loaded ({first}); "
                         "the folder is incomplete or damaged: save the pipeline again") from None


def _model_problem(e: DbbatchError, base_model: str) -> str:
    line = str(e) if str(e).startswith("base_model") else f"base_model: {e}"
    if ":" in base_model and "://" not in base_model and not base_model.startswith("builtin:"):
        from dbbatch.models.builtin import builtin_names

        line += did_you_mean(base_model, [f"builtin:{a}" for a in builtin_names()])
    return line


def model_family(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool) -> Optional[Any]:
    """The base model's family from its model_index.json (a built-in's is known), or None when not reachable
    here or unreadable (the model checks report that). An unsupported pipeline class raises its one line."""
    from dbbatch.models import families
    from dbbatch.models.builtin import builtin_family, builtin_names
    from dbbatch.models.loading import resolve_source

    kind, where = resolve_source(base_model, base_dir)
    if kind == "builtin":
        return builtin_family(where) if where in builtin_names() else None
    try:
        index = _read_config(kind, where, "model_index.json", storage, check_remote)
    except (DbbatchError, ValueError):
        return None
    return families.of_index(index, base_model) if index is not None else None


def family_problems(manifest: Manifest, family: Any, denoiser: Optional[dict[str, Any]] = None) -> list[str]:
    """Family sections (`sdxl:`) set in `defaults` or a subject that the base model's family does not read; a
    training method the family refuses (`Family.full_fine_tune`); and the family's own checks of its section
    against the denoiser's config (`Family.setting_problems`; `denoiser` None: not reachable here)."""
    from dbbatch.models import families

    problems = families.inapplicable(family, manifest.defaults, "defaults.", manifest.base_model)
    for i, entry in enumerate(manifest.subjects):
        problems += families.inapplicable(family, entry, f"{where_of(manifest, i)}.", manifest.base_model)
    for s in resolve_subjects(manifest, None):
        entry = manifest.subjects[s.index]
        if family.full_fine_tune and s.train.method == "full":
            where = (f"{where_of(manifest, s.index)}.train.method" if "method" in entry.train.model_fields_set
                     else "defaults.train.method")
            problems.append(f"{where}: full fine-tuning is refused for {family.title} ({manifest.base_model}): "
                            f"{family.full_fine_tune}")
        if denoiser is not None:
            own = getattr(entry, family.section, None) if family.section else None
            prefix = where_of(manifest, s.index) if own is not None else "defaults"
            problems += family.setting_problems(family.settings_of(s), f"{prefix}.{family.section}", denoiser,
                                                manifest.base_model)
    return list(dict.fromkeys(problems))


def denoiser_config(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool,
                    family: Any) -> Optional[dict[str, Any]]:
    """The denoiser's config (`unet/config.json`, `transformer/config.json`), or None when not reachable here."""
    return component_config(base_model, base_dir, storage, check_remote, family.denoiser)


def denoiser_layers(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool,
                    family: Any = None) -> Optional[list[str]]:
    """The names of the denoiser's Linear/Conv2d layers, from its config alone (built on the meta device: no
    weights), or None when the config is not reachable here."""
    from dbbatch.models import families
    from dbbatch.models.lora import adaptable_layers

    family = family or families.by_name("sd")
    config = denoiser_config(base_model, base_dir, storage, check_remote, family)
    if config is None:
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        denoiser = family.denoiser_from_config(config)
    return adaptable_layers(denoiser)


def lora_target_problems(manifest: Manifest, base_dir: Optional[Path], storage: Any, check_remote: bool,
                         family: Any = None) -> list[str]:
    """`train.lora.target` patterns that match no layer of the base model's denoiser, named where they were set."""
    from dbbatch.models.lora import target_problem

    subjects = [s for s in resolve_subjects(manifest, None) if s.train.method == "lora"]
    if not subjects:
        return []
    layers = denoiser_layers(manifest.base_model, base_dir, storage, check_remote, family)
    if layers is None:
        return []
    problems = {}
    for s in subjects:
        where = where_of(manifest, s.index) if "target" in manifest.subjects[s.index].train.lora.model_fields_set else "defaults"
        problem = target_problem(f"{where}.train.lora.target", layers, s.train.lora.target)
        if problem:
            problems.setdefault(where, problem)
    return list(problems.values())


def evaluation_model_problems(manifest: Manifest, base_dir: Optional[Path], storage: Any, check_remote: bool) -> list[str]:
    """evaluation.clip / evaluation.dino that cannot be loaded: one line per model, naming the key the user
    wrote (the subject's own, or `defaults` once for every subject inheriting it). Reads configs, not weights."""
    from dbbatch.quality import evaluators

    problems, seen = [], set()
    for subject in resolve_subjects(manifest, None):
        for key in ("clip", "dino"):
            source = getattr(subject.evaluation, key)
            if source is None:
                continue
            own = manifest.subjects[subject.index].evaluation.model_fields_set
            where = f"{where_of(manifest, subject.index)}.evaluation.{key}" if key in own else f"defaults.evaluation.{key}"
            if (where, source) in seen:
                continue
            seen.add((where, source))
            if problem := evaluators.check(source, key, base_dir, storage, check_remote):
                problems.append(f"{where}: {problem}")
    return problems
