"""Which subjects train together (`packing.subjects_per_step`): pure functions of the manifest.

Subjects whose training shape agrees (training_shape: everything of train but the seed, with the resolution and
where the class prior comes from) are grouped in manifest order into cohorts of up to K: each subject joins the
first open cohort of its shape, or opens a new one. A subject that cannot be packed (alone_reason) trains
alone. A cohort whose checkpoint is stored (a pod was preempted) is formed again first, from its members that
are still to train, so a rerun resumes it instead of starting over; any part of a stored cohort resumes
exactly (packed_training.slice_checkpoint), so a subject that finished or left the manifest changes nothing for
the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

# train settings that may differ inside a cohort: each subject's own seed; and two that a frozen text encoder
# never uses
PER_SUBJECT = ("seed", "text_encoder_learning_rate", "train_text_encoder")
# family sections whose keys change how a step trains (FLUX.1's timestep draw and training guidance); SDXL's
# sizes are conditioning each member carries in its own rows, so they may differ inside a cohort
SHAPE_SECTIONS = ("flux",)


@dataclass(frozen=True)
class StoredCohort:
    """A cohort checkpoint found in the output: `<output>/_cohorts/<id>/`."""

    id: str
    members: tuple[str, ...]
    step: int


@dataclass
class Cohort:
    members: list[Any]  # Subjects, in manifest order
    alone: Optional[str] = None  # why a single subject trains alone (None for a packed cohort)
    resumes: Optional[StoredCohort] = None  # the stored cohort its checkpoint comes from
    shape: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return cohort_id([s.id for s in self.members])

    @property
    def packed(self) -> bool:
        """Trains through the packed trainer (two or more members, or part of a stored cohort)."""
        return self.alone is None


def cohort_id(member_ids: Iterable[str]) -> str:
    return "cohort-" + hashlib.sha256("\n".join(member_ids).encode()).hexdigest()[:10]


def alone_reason(subject: Any) -> Optional[str]:
    """Why `subject` cannot share a step with others (None: it can)."""
    t = subject.train
    if t.method != "lora":
        return "train.method is full (each subject trains its own copy of the UNet)"
    if t.lora.text_encoder:
        return "train.lora.text_encoder is true (the text encoder's adapters are not packed)"
    if t.lora.target == "all-linear+conv":
        return "train.lora.target all-linear+conv has conv layers (packed adapters are linear only)"
    if t.gradient_accumulation != 1:
        return "train.gradient_accumulation is above 1"
    if t.optimizer != "adamw":
        return f"train.optimizer is {t.optimizer} (block-wise state would couple subjects)"
    if isinstance(t.devices, int) and t.devices > 1:
        return "train.devices is above 1 (DDP)"
    return None


def training_shape(subject: Any) -> dict[str, Any]:
    """What must agree for subjects to train in one step."""
    train = {k: v for k, v in subject.train.model_dump(mode="json").items() if k not in PER_SUBJECT}
    shape = {"train": train, "resolution": subject.resolution,
             "priors.source": subject.priors.source if subject.train.with_prior_preservation else None}
    for name in SHAPE_SECTIONS:
        if getattr(subject, name, None) is not None:
            shape[name] = getattr(subject, name).model_dump(mode="json")
    return shape


def _key(subject: Any) -> str:
    return json.dumps(training_shape(subject), sort_keys=True)


def cohorts(subjects: list[Any], per_step: int, stored: Iterable[StoredCohort] = ()) -> list[Cohort]:
    """Group `subjects` (in manifest order) into cohorts of at most `per_step`; every subject is in exactly one.
    Stored cohorts come first (their present, packable members of one shape), in the order of their first
    member, even at K=1 (a part of a stored cohort resumes its checkpoint exactly); the others are grouped
    first-fit by shape. The result is ordered by each cohort's first member."""
    per_step = max(1, per_step)
    by_id = {s.id: s for s in subjects}
    taken: set[str] = set()
    out: list[Cohort] = []
    for stored_cohort in sorted(stored, key=lambda c: min((by_id[m].index for m in c.members if m in by_id), default=1 << 30)):
        present = [by_id[m] for m in stored_cohort.members if m in by_id and m not in taken and alone_reason(by_id[m]) is None]
        if not present:
            continue
        key = _key(present[0])
        present = [s for s in present if _key(s) == key]
        present.sort(key=lambda s: s.index)
        for start in range(0, len(present), per_step):
            chunk = present[start : start + per_step]
            out.append(Cohort(chunk, resumes=stored_cohort, shape=training_shape(chunk[0])))
            taken.update(s.id for s in chunk)
    open_by_key: dict[str, Cohort] = {}
    for s in subjects:
        if s.id in taken:
            continue
        reason = "packing.subjects_per_step is 1" if per_step == 1 else alone_reason(s)
        if reason is not None:
            out.append(Cohort([s], alone=reason))
            continue
        key = _key(s)
        current = open_by_key.get(key)
        if current is None or len(current.members) >= per_step:
            current = open_by_key[key] = Cohort([], shape=training_shape(s))
            out.append(current)
        current.members.append(s)
    for c in out:
        if c.alone is None and len(c.members) == 1 and c.resumes is None:
            c.alone = "no other subject of its shape is left to train with it (its train settings but the seed, resolution, priors.source)"
    out.sort(key=lambda c: c.members[0].index)
    return out


def describe(cohort: Cohort) -> str:
    """One line for `run --dry-run`."""
    names = ", ".join(s.id for s in cohort.members)
    if not cohort.packed and cohort.resumes is None:
        return f"{names}: alone: {cohort.alone}"
    tail = f"; resumes {cohort.resumes.id} at step {cohort.resumes.step}" if cohort.resumes else ""
    return f"{cohort.id} (K={len(cohort.members)}): {names}{tail}"
