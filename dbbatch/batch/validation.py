"""Checks beyond the schema: the base model, tokens against its tokenizer, sizes against its VAE, storage.

`dbbatch validate` runs all of them and reports every problem together; `dbbatch run` runs the local ones
(no image downloads) before it starts, so a batch never fails after an hour on something checkable up front.

The checks against the base model (tokens, family, LoRA targets, evaluation models) are in model_checks.py.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dbbatch.batch.model_checks import (
    _model_problem,
    denoiser_config,
    evaluation_model_problems,
    family_problems,
    load_tokenizer,
    lora_target_problems,
    model_family,
    model_geometry,
    token_problems,
)
from dbbatch.config.manifest import Manifest, source_of, where_of
from dbbatch.config.manifest_errors import closest
from dbbatch.config.resolve import resolve_location, resolve_subjects
from dbbatch.core.errors import DbbatchError, ModelError, StorageError

# Protocols people mean when they mistype one (for "did you mean"); what is installed decides what works.
COMMON_PROTOCOLS = ["file", "s3", "gs", "gcs", "az", "abfs", "memory", "http", "https", "hf"]


@dataclass
class Findings:
    """What the checks found. `problems` are the manifest's or the inputs' fault (exit 2, retrying will not
    help); `storage` are output locations that cannot be written (exit 3, fix access and retry)."""

    problems: list[str] = field(default_factory=list)
    storage: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolution_step(factor: int, patch: int = 1) -> int:
    """What a resolution must be a multiple of: latents of whole pixels (the VAE's scale factor: 8 for Stable
    Diffusion, 2 for builtin:tiny-sd) in whole patches (FLUX.1 packs 2x2: 16), rendered by diffusers' pipelines
    (multiples of 8)."""
    return math.lcm(factor * patch, 8)


def resolution_problems(manifest: Manifest, factor: int, native: int, patch: int = 1) -> list[str]:
    """Resolutions that are not a multiple of `resolution_step`, reported where the value is set."""
    problems: list[str] = []
    step = resolution_step(factor, patch)
    for i, s in enumerate(manifest.subjects):
        where = f"{where_of(manifest, i)}.resolution" if s.resolution is not None else "defaults.resolution"
        res = s.resolution if s.resolution is not None else manifest.defaults.resolution
        if res is None or res % step == 0:
            continue
        lower, upper = res - res % step, res - res % step + step
        options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        patches = f", in {patch}x{patch} latent patches" if patch > 1 else ""
        line = (f"{where}: {res} is not a multiple of {step} (diffusers renders multiples of 8, and the VAE scale "
                f"factor of {manifest.base_model} is {factor}{patches}; native size {native}); use {options}")
        if line not in problems:
            problems.append(line)
    return problems


def location_problem(storage: Any, location: str, field_name: str) -> Optional[str]:
    """Why no filesystem handles `location` (unknown protocol, missing package), or None."""
    from dbbatch.store.locations import protocol_of

    try:
        storage.check_location(location)
    except StorageError as e:
        proto = protocol_of(location)
        close = closest(proto, COMMON_PROTOCOLS, cutoff=0.5)
        hint = f"; did you mean '{close}://'?" if close and close != proto else ""
        return f"{field_name}: {e}{hint}"
    return None


def writable_problem(storage: Any, location: str, field_name: str) -> Optional[str]:
    """Why a probe object cannot be written and deleted under `location`, or None."""
    try:
        storage.check_writable(location)
    except StorageError as e:
        from dbbatch.store.locations import is_remote

        if is_remote(location):  # storage already names the URL and the cause (credentials, bucket, access)
            return f"{field_name}: {e}"
        reason = getattr(e.__cause__, "strerror", None) or str(e)
        return f"{field_name}: {location} is not writable ({reason}); grant write access to it or choose another {field_name}"
    return None


# tracking service -> (its module, how to install it): dbbatch's optional extras
TRACKING_EXTRAS = {"wandb": ("wandb", "pip install 'dbbatch[wandb]'"), "mlflow": ("mlflow", "pip install 'dbbatch[mlflow]'")}


def installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def missing_extras(tracking: Any) -> list[str]:
    """One line per tracking service the manifest asks for whose package is not installed."""
    out = []
    for name in tracking.backends():
        module, command = TRACKING_EXTRAS[name]
        if not installed(module):
            out.append(f"tracking.{name}: the {module} package is not installed; {command} (or remove tracking.{name})")
    return out


def check_manifest(manifest: Manifest, base_dir: Optional[Path], storage: Any, check_remote: bool,
                   output: str, prior_cache: str) -> Findings:
    """Every problem and warning; nothing is raised for a per-item problem, so all are reported at once.
    With `check_remote`, also every subject's images (each file is read and decoded) and write access."""
    from dbbatch.store.locations import secret_option_paths

    found = Findings()
    found.warnings += [f"{path}: looks like a secret; credentials belong in the environment or the pod's identity, "
                       "not in the manifest (it is redacted in config.yaml)" for path in secret_option_paths(manifest.storage_options)]
    try:
        tokenizer = load_tokenizer(manifest.base_model, base_dir, storage, check_remote)
    except DbbatchError as e:
        found.problems.append(_model_problem(e, manifest.base_model))
        tokenizer = None
    if tokenizer is not None:
        p, w = token_problems(manifest, tokenizer)
        found.problems += p
        found.warnings += w
    try:
        family = model_family(manifest.base_model, base_dir, storage, check_remote)
    except ModelError as e:
        found.problems.append(_model_problem(e, manifest.base_model))
        family = None
    if family is not None:
        denoiser = denoiser_config(manifest.base_model, base_dir, storage, check_remote, family)
        found.problems += family_problems(manifest, family, denoiser)
    geometry = model_geometry(manifest.base_model, base_dir, storage, check_remote, family)
    if geometry is not None:
        found.problems += resolution_problems(manifest, *geometry)
    found.problems += lora_target_problems(manifest, base_dir, storage, check_remote, family)
    found.warnings += packing_warnings(manifest)
    found.problems += evaluation_model_problems(manifest, base_dir, storage, check_remote)
    found.problems += missing_extras(manifest.tracking)
    eight_bit = [s.index for s in resolve_subjects(manifest, None) if s.train.optimizer == "adamw8bit"]
    lacking = adamw8bit_lacks() if eight_bit else None
    if lacking:
        # Name the key the user wrote: the subject's own, or `defaults` once for every subject inheriting it.
        wheres = {f"{where_of(manifest, i)}.train.optimizer" if "optimizer" in manifest.subjects[i].train.model_fields_set
                  else "defaults.train.optimizer" for i in eight_bit}
        for where in sorted(wheres):
            found.problems.append(f"{where}: adamw8bit needs {lacking} (bitsandbytes' 8-bit AdamW runs on CUDA GPUs only); use adamw")
    usable = []
    for location, name in ((output, "output"), (prior_cache, "prior_cache")):
        if not usable and name == "prior_cache" and location.startswith(output + "/"):
            continue  # inside an output already reported: one line is enough
        problem = location_problem(storage, location, name)
        if problem:
            found.problems.append(problem)
        else:
            usable.append((location, name))
    found.problems, found.warnings = list(dict.fromkeys(found.problems)), list(dict.fromkeys(found.warnings))
    if not check_remote:
        return found
    native = geometry[1] if geometry else 64
    checked: set[str] = set()
    for subject in resolve_subjects(manifest, base_dir):
        where = f"{source_of(manifest, subject.index)}.images"
        if where in checked:  # a sweep's variants share their subject's photos: read them once
            continue
        checked.add(where)
        p, w = _image_findings(subject, storage, subject.resolution or native)
        found.problems += [f"{where}: {x}" for x in p]
        found.warnings += [f"{where}: {x}" for x in w]
    for location, name in usable:
        if found.storage and location.startswith(output + "/"):
            continue  # inside an output already reported as not writable: one line is enough
        problem = writable_problem(storage, location, name)
        if problem:
            found.storage.append(problem)
    return found


def packing_warnings(manifest: Manifest) -> list[str]:
    """packing.subjects_per_step above 1 where no two subjects can share a step (config/packing.py says why)."""
    from dbbatch.config.packing import cohorts

    per_step = manifest.packing.subjects_per_step
    if per_step <= 1:
        return []
    groups = cohorts(resolve_subjects(manifest, None), per_step)
    if any(c.packed for c in groups):
        return []
    reasons = sorted({c.alone for c in groups if c.alone}, key=lambda r: (r.startswith("no other subject"), r))
    return [f"packing.subjects_per_step: {per_step}, but no two subjects can train together, so every subject trains "
            f"alone; {reasons[0]}{' (and more)' if len(reasons) > 1 else ''}; `dbbatch run --dry-run` shows the cohorts"]


def adamw8bit_lacks() -> Optional[str]:
    """What this machine lacks for `optimizer: adamw8bit` ("the bitsandbytes package", "a CUDA GPU"), or None."""
    import importlib.util

    import torch

    lacking = []
    if importlib.util.find_spec("bitsandbytes") is None:
        lacking.append("the bitsandbytes package")
    if not torch.cuda.is_available():
        lacking.append("a CUDA GPU")
    return " and ".join(lacking) or None


def _image_findings(subject: Any, storage: Any, resolution: int) -> tuple[list[str], list[str]]:
    """Read and decode every image of a subject: (problems, warnings), one line per bad file."""
    from dbbatch.train.images import decode_files, no_images_message, pick_image_files

    try:
        files, skipped = pick_image_files(storage.expand(subject.images), subject.images)
    except DbbatchError as e:
        return [str(e)], []
    warnings = [f"skipping {u}: not an image file name" for u in skipped]
    if not files:
        return [no_images_message(subject.images)], warnings
    problems: list[str] = []

    def contents():
        for url in files:
            try:
                yield url, storage.read_bytes(url)
            except DbbatchError as e:
                problems.append(str(e))

    _, notes, errors = decode_files(contents(), resolution)
    return problems + errors, warnings + notes


def locations(manifest: Manifest, base_dir: Optional[Path], output_override: Optional[str]) -> tuple[str, str]:
    """(output, prior_cache) with relative paths resolved against the manifest's folder."""
    from dbbatch.store.locations import join

    out = output_override or manifest.output
    out = resolve_location(out, Path.cwd()) if output_override else resolve_location(out, base_dir or Path.cwd())
    cache = manifest.prior_cache
    cache = resolve_location(cache, base_dir or Path.cwd()) if cache else join(out, "_priors")
    return out.rstrip("/"), cache.rstrip("/")
