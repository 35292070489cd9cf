"""Defaults merged into each subject: the manifest's `defaults:`, the base model's carried defaults, dbbatch's.

Pure: `resolve_subjects` turns a parsed Manifest into one Subject per entry, `apply_model_defaults` fills in
what a base model carries (models/defaults.py reads it), and the checks that need the merged settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from dbbatch.config.manifest import Manifest, Subject, format_prompt, source_of, where_of
from dbbatch.config.manifest_errors import problems_from
from dbbatch.config.settings import (
    DEFAULT_LEARNING_RATES,
    FAMILY_SECTIONS,
    SECTIONS,
    EvaluationConfig,
    PriorConfig,
    SampleConfig,
    SubjectSettings,
    TrainConfig,
    set_paths,
)
from dbbatch.core.errors import ManifestError


def merged_checks(m: Manifest) -> list[str]:
    """Checks on each subject's settings after `defaults` are merged in."""
    problems: list[str] = []
    for i, subject in enumerate(resolve_subjects(m, base_dir=None)):
        t = subject.train
        where = where_of(m, i)
        if t.lr_warmup_steps >= t.max_steps:
            problems.append(f"{where}.train.lr_warmup_steps: must be < max_steps ({t.max_steps}), got {t.lr_warmup_steps}")
        from_images = subject.priors.source == "images"
        if t.with_prior_preservation and from_images and subject.priors.num_images == 0:
            problems.append(f"{where}.priors.num_images: must be > 0 with train.with_prior_preservation, got 0")
        if not from_images and not t.with_prior_preservation:
            problems.append(f"{where}.priors.source: base_model is a kind of prior preservation, but "
                            "train.with_prior_preservation is false; set it true or remove priors.source")
        if not from_images and t.method != "lora":
            problems.append(f"{where}.priors.source: base_model needs train.method lora (the base model's prediction "
                            "is the adapters switched off); use source: images with method full")
        if t.method == "full" and _lora_given(m, i):
            problems.append(f"{where}.train.lora: set, but train.method is full (LoRA settings apply to method lora); "
                            "set train.method: lora or remove train.lora")
        if subject.sdxl is not None and subject.sdxl.train_text_encoder_2 and not (
                t.lora.text_encoder if t.method == "lora" else t.train_text_encoder):
            key = "train.lora.text_encoder" if t.method == "lora" else "train.train_text_encoder"
            problems.append(f"{where}.sdxl.train_text_encoder_2: trains the second text encoder beside the first, but "
                            f"{key} is false; set {key}: true or remove sdxl.train_text_encoder_2")
        if t.method == "lora" and t.train_text_encoder:
            problems.append(f"{where}.train.train_text_encoder: fine-tunes the whole text encoder, but train.method is "
                            "lora; set train.lora.text_encoder: true for text-encoder adapters")
        problems += _evaluation_problems(subject.evaluation, t, f"{where}.evaluation", subject.id)
        fmt = m.model_format
        if t.method == "lora" and fmt == "delta":
            problems.append(f"model_format: delta stores fine-tuned components, but {where} ({subject.id}) trains LoRA "
                            "adapters; use model_format lora (the adapters) or full (merged into a full pipeline)")
        if t.method == "full" and m.base_dtype != "fp32":
            problems.append(f"base_dtype: {m.base_dtype} holds the base weights in {m.base_dtype}, but {where} "
                            f"({subject.id}) fine-tunes them (method full), which needs fp32; set train.method: lora or "
                            "base_dtype fp32")
        if t.method == "full" and fmt == "lora":
            problems.append(f"model_format: lora stores LoRA adapters, but {where} ({subject.id}) trains with "
                            "method full; set train.method: lora or model_format full (or delta)")
    return problems


def _evaluation_problems(e: EvaluationConfig, t: TrainConfig, where: str, sid: str) -> list[str]:
    """Evaluation settings that cannot work together (metrics whose model is not set, keep: best without scores)."""
    from dbbatch.config.metric_names import NEEDS

    problems = []
    if not e.enabled:
        set_keys = [k for k, on in (("keep", e.keep == "best"), ("select_by", e.select_by is not None),
                                    ("flag_below", e.flag_below), ("flag_above", e.flag_above),
                                    ("flag_not_improved", e.flag_not_improved)) if on]
        if set_keys:
            key = set_keys[0]
            problems.append(f"{where}.{key}: set, but no evaluation model is ({sid}); set evaluation.clip (and/or "
                            "evaluation.dino), e.g. clip: builtin:toy-clip on the toy world")
        return problems
    for j, template in enumerate(e.prompts or []):
        if "{token}" not in template:
            problems.append(f"{where}.prompts[{j}]: {template!r} has no {{token}}; evaluation scores the subject's own "
                            f"prompts (the class prompt is scored for class_drift and pres already) ({sid})")
    selection = e.selection()
    named = [("select_by", m) for m in ([selection] if isinstance(selection, str) else selection)]
    named += [("flag_below", m) for m in e.flag_below] + [("flag_above", m) for m in e.flag_above]
    named += [("flag_not_improved", m) for m in e.flag_not_improved]
    for key, metric in named:
        model = NEEDS[metric]
        if getattr(e, model) is None:
            problems.append(f"{where}.{key}: {metric} needs evaluation.{model}, which is not set ({sid}); set it or "
                            f"use a metric of evaluation.{'dino' if model == 'clip' else 'clip'}")
            break
    if e.keep == "best" and e.every >= t.max_steps:
        problems.append(f"{where}.every: {e.every} scores only the last step (train.max_steps {t.max_steps}), so keep: "
                        f"best has nothing to choose from ({sid}); lower every or use keep: last")
    if e.keep == "best" and t.devices not in ("auto", 1):
        problems.append(f"{where}.keep: best scores the subject during training, which runs in one process; with "
                        f"train.devices {t.devices} use keep: last (the last step is still scored) ({sid})")
    return problems


def _lora_given(m: Manifest, i: int) -> bool:
    """Whether subject i's LoRA settings are its own to check: it sets train.lora itself, or `defaults` set it
    and the subject does not override train.method (a subject that says `method: full` opts out of them)."""
    own, given = set_paths(m.subjects[i]), set_paths(m.defaults)
    return "train.lora" in own or ("train.lora" in given and "train.method" not in own)


def _merge(base: BaseModel, *overrides: BaseModel) -> dict[str, Any]:
    """`base` with each override's set keys laid over it; a nested section (train.lora) is merged key by key,
    so a subject's `train: {lora: {rank: 4}}` keeps the `lora.target` its defaults set."""
    merged = base.model_dump()
    for o in overrides:
        _overlay(merged, o)
    return merged


def _overlay(merged: dict[str, Any], o: BaseModel) -> None:
    for key in o.model_fields_set:
        value = getattr(o, key)
        if isinstance(value, BaseModel) and isinstance(merged.get(key), dict):
            _overlay(merged[key], value)
        else:
            merged[key] = o.model_dump(include={key})[key]


# Settings whose origin `Subject.settings_from` records (config.yaml, `dbbatch validate --show-settings`): the
# ones a base model may carry, plus any other key its defaults file sets.
TRACKED_SETTINGS = ("resolution", "train.learning_rate", "train.max_steps", "priors.num_images")


def apply_model_defaults(m: Manifest, carried: dict[str, Any], origin: str) -> Manifest:
    """The manifest with the base model's training defaults (`carried`, SubjectSettings keys) filled into
    `defaults` wherever the manifest sets nothing: manifest `defaults` and each subject's keys still win."""
    if not carried:
        return m
    carried, method_lrs = _split_method_lrs(carried, origin)
    try:
        model = SubjectSettings.model_validate(carried)
    except ValidationError as e:
        raise ManifestError(problems_from(e, SubjectSettings), origin) from None
    d = m.defaults
    filled: dict[str, Any] = {}
    for key in ("resolution", "instance_prompt", "class_prompt"):
        value_from = d if key in d.model_fields_set or key not in model.model_fields_set else model
        if key in d.model_fields_set or key in model.model_fields_set:
            filled[key] = getattr(value_from, key)
    for name, cls in SECTIONS.items():
        merged = {**getattr(model, name).model_dump(exclude_unset=True), **getattr(d, name).model_dump(exclude_unset=True)}
        filled[name] = cls(**merged)
    for name, cls in FAMILY_SECTIONS.items():
        if getattr(d, name) is not None or getattr(model, name) is not None:
            filled[name] = cls(**_merge(cls(), *[getattr(x, name) for x in (model, d) if getattr(x, name) is not None]))
    out = m.model_copy(update={"defaults": SubjectSettings(**filled)})
    out._carried = {path: origin for path in set_paths(model) - set_paths(d)}
    if "train.learning_rate" not in set_paths(d):
        out._method_lrs, out._method_lrs_from = method_lrs, origin
    problems = merged_checks(out)
    if problems:
        raise ManifestError(problems, origin)
    return out


def _split_method_lrs(carried: dict[str, Any], origin: str) -> tuple[dict[str, Any], dict[str, float]]:
    """A model's defaults file may give train.learning_rate per method ({"full": 5e-4, "lora": 2e-3}): those
    apply where the manifest sets no learning rate, by each subject's method. Returns (the rest, that map)."""
    train = carried.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("learning_rate"), dict):
        return carried, {}
    lrs = train["learning_rate"]
    bad = [k for k, v in lrs.items() if k not in DEFAULT_LEARNING_RATES or not isinstance(v, (int, float)) or v <= 0]
    if bad:
        raise ManifestError([f"train.learning_rate: per-method values must be {{full: <rate>, lora: <rate>}} with rates "
                             f"> 0; {bad[0]!r} is not"], origin)
    rest = {**carried, "train": {k: v for k, v in train.items() if k != "learning_rate"}}
    return rest, {k: float(v) for k, v in lrs.items()}


def settings_sources(m: Manifest, i: int) -> dict[str, str]:
    """Where subject i's tracked settings come from: `subjects[i]`, `defaults`, the model's file, `dbbatch`."""
    s = m.subjects[i]
    own, given = set_paths(s), set_paths(m.defaults)
    out = {}
    for path in sorted(set(TRACKED_SETTINGS) | set(m._carried) | set(s._swept)):
        if path in s._swept:
            out[path] = f"{source_of(m, i)}.sweep"
        elif path in own:
            out[path] = source_of(m, i)
        elif path in m._carried:
            out[path] = m._carried[path]
        elif path in given:
            out[path] = "defaults"
        elif path == "train.learning_rate" and _method(m, i) in m._method_lrs:
            out[path] = m._method_lrs_from
        else:
            out[path] = "dbbatch"
    return out


def resolve_subjects(m: Manifest, base_dir: Optional[Path]) -> list[Subject]:
    """Merge built-in defaults <- manifest `defaults` <- the subject's own keys, one nested section at a time.
    (`defaults` includes the base model's carried defaults once `with_model_defaults` has run.)"""
    out = []
    for i, s in enumerate(m.subjects):
        d = m.defaults
        flat = {k: v for k, v in _merge(SubjectSettings(), d, s).items() if k in ("resolution", "instance_prompt", "class_prompt")}
        images = [s.images] if isinstance(s.images, str) else list(s.images)
        if base_dir is not None:
            images = [resolve_location(x, base_dir) for x in images]
        out.append(
            Subject(
                id=s.id,
                index=i,
                token=s.token,
                class_noun=s.class_noun,
                images=images,
                resolution=flat["resolution"],
                instance_prompt=format_prompt(flat["instance_prompt"], s.token, s.class_noun),
                class_prompt=format_prompt(flat["class_prompt"], s.token, s.class_noun),
                train=_resolved_train(m, TrainConfig(**_merge(TrainConfig(), d.train, s.train))),
                priors=PriorConfig(**_merge(PriorConfig(), d.priors, s.priors)),
                samples=SampleConfig(**_merge(SampleConfig(), d.samples, s.samples)),
                evaluation=EvaluationConfig(**_merge(EvaluationConfig(), d.evaluation, s.evaluation)),
                **{name: cls(**_merge(cls(), *[getattr(x, name) for x in (d, s) if getattr(x, name) is not None]))
                   if getattr(d, name) is not None or getattr(s, name) is not None else None
                   for name, cls in FAMILY_SECTIONS.items()},
                instance_template=flat["instance_prompt"],
                model_format=m.model_format or ("lora" if _method(m, i) == "lora" else "full"),
                settings_from=settings_sources(m, i),
                sweep_of=s._sweep_of,
                swept=dict(s._swept),
            )
        )
    return out


def _method(m: Manifest, i: int) -> str:
    return TrainConfig(**_merge(TrainConfig(), m.defaults.train, m.subjects[i].train)).method


def _resolved_train(m: Manifest, train: TrainConfig) -> TrainConfig:
    """`train` with learning_rate null replaced by the base model's default for the method, else dbbatch's."""
    if train.learning_rate is not None:
        return train
    lr = m._method_lrs.get(train.method, DEFAULT_LEARNING_RATES[train.method])
    return train.model_copy(update={"learning_rate": lr})


def resolve_location(location: str, base_dir: Path) -> str:
    """Relative local paths resolve against the manifest's folder; URLs and absolute paths stay as they are."""
    if "://" in location or location.startswith("builtin:") or Path(location).is_absolute():
        return location
    resolved = str((base_dir / location).resolve())
    # keep a trailing slash: it tells a folder from a file before anything is listed
    return resolved + "/" if location.endswith("/") else resolved
