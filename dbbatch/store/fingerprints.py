"""What decides a subject's result, as a flat dict that checkpoints and `_stage.json` record (pure functions).

Resume and the `trained` stage compare the recorded fingerprint with the one of this run and name every
entry that differs: resuming a checkpoint trained on other photos, at another resolution or from another base
model would silently mix two trainings, and republishing a stored model under a config.yaml that did not make
it would lie. Settings that may change between attempts (RESUME_SETTINGS in train/checkpoints.py: the learning rate,
the batch size, max_steps...) are not in the checkpoint fingerprint; they are in the stage fingerprint, since
the stored model was trained with them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

# Training settings that do not change the result (where and how often state is saved, memory trade-offs),
# so changing them neither restarts training nor retrains a stored model.
NEUTRAL_TRAIN = ("checkpoint_every", "checkpoints_keep", "devices", "gradient_checkpointing")
# Settings added after fingerprints were first recorded, with the value that reproduces the older behaviour:
# at that value they are left out, so models and checkpoints stored by an older dbbatch still match.
ADDED_LATER = {"train.method": "full", "priors.source": "images"}


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """{"train.lora": {"rank": 4}} -> {"train.lora.rank": 4}: a change names the one setting that differs."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def images_digest(contents: Iterable[bytes]) -> str:
    """Digest of the instance photos' bytes, in the order training sees them (the order picks the data order)."""
    h = hashlib.sha256()
    for data in contents:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def subject_fingerprint(subject: Any, resolution: int, model_identity: str, instance_images: str,
                        resumable: Iterable[str], family: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every input and setting except those in `resumable` (their
    change is reported and the resume goes on) and NEUTRAL_TRAIN. `family`: the model family's resolved
    settings (`Family.fingerprint`; empty for SD 1.x/2.x)."""
    skip = set(resumable) | set(NEUTRAL_TRAIN)
    fp: dict[str, Any] = {"subject": subject.id, "base_model": model_identity, "resolution": resolution,
                          "instance_images": instance_images, "instance_prompt": subject.instance_prompt}
    train = subject.train.model_dump(mode="json")
    if train["method"] != "lora":
        train.pop("lora")  # not used by full fine-tuning
    if train["with_prior_preservation"]:
        fp["class_prompt"] = subject.class_prompt
        priors = subject.priors.model_dump(mode="json")
        if priors["source"] == "base_model":  # no class images: their settings do not matter
            priors = {"source": priors["source"]}
        fp.update({f"priors.{k}": v for k, v in priors.items() if k != "batch_size"})
    fp.update(flatten("train.", {k: v for k, v in train.items() if k not in skip}))
    fp.update(flatten("family.", family or {}))
    return {k: v for k, v in fp.items() if ADDED_LATER.get(k, object()) != v}


def stage_fingerprint(subject: Any, resolution: int, model_identity: str, instance_images: str,
                      output_dtype: str, model_format: str, family: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a stored model (the `trained` stage) must match to be published as this run's result: the
    checkpoint fingerprint plus every setting that may change between attempts, and how it is stored."""
    fp = subject_fingerprint(subject, resolution, model_identity, instance_images, resumable=(), family=family)
    fp.update(output_dtype=output_dtype, model_format=model_format)
    return fp


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (old -> new)' for every entry that differs, in key order; empty when they match."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, ADDED_LATER.get(key, "unset")), current.get(key, ADDED_LATER.get(key, "unset"))
        if old != new:
            out.append(f"{key} ({_short(old)} -> {_short(new)})")
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
