"""What every stage of one subject shares: its batch, subject, output folder, lease and scratch folder.

The attributes a stage hands the next live here too (set as the stages run): `resolution` (begin),
`images_digest` (fetch), `priors_generated` (priors, train), `trainable_parameters` and `train_logs` (train;
a packed subject's logs are its cohort's), `instance_images` and `klass` (a packed subject's inputs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from dbbatch.config.manifest import Subject
from dbbatch.store.leases import Lease


class SubjectContext:
    """One subject's run as its stages see it. `b` is the Batch (batch/batch.py): the shared base model,
    storage, options, reporter and the per-process caches."""

    def __init__(self, batch: Any, subject: Subject, out: str, lease: Optional[Lease] = None):
        self.b, self.s, self.out, self.lease = batch, subject, out, lease
        self.storage = batch.storage
        self.work = self.scratch(batch, subject)
        self.seconds: dict[str, float] = {}
        self.label = f"{subject.id} "
        self.priors_generated = 0

    @staticmethod
    def scratch(batch: Any, subject: Subject) -> Path:
        """The subject's folder in this worker's scratch (removed with it when the batch ends)."""
        return batch.scratch / "subjects" / subject.id

    def tracking(self) -> Any:
        return self.b.tracking(self.s, self.out, self.lease.check if self.lease else None)

    def holds_lease(self, what: str) -> None:
        """Before any write to the subject's outputs: the lease is still ours (no I/O)."""
        if self.lease is not None:
            self.lease.check(what)

    def confirm_lease(self, what: str) -> None:
        """Before a write that decides the outcome: the lease is still ours, asked of the store."""
        if self.lease is not None:
            self.lease.verify(what)

    def timed(self, phase: str, started: float) -> None:
        """Add the seconds since `started` to `phase` in metrics.json's `seconds`."""
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.monotonic() - started, 3)

    def fingerprint(self, stage: bool = False) -> dict[str, Any]:
        """What a checkpoint (or, with `stage`, the stored model) must match to count as this run's."""
        from dbbatch.store.fingerprints import stage_fingerprint, subject_fingerprint
        from dbbatch.train.checkpoints import RESUME_SETTINGS

        model = self.b.model
        family = model.family.fingerprint(model.family.settings_of(self.s), self.resolution)
        if stage:
            return stage_fingerprint(self.s, self.resolution, model.identity, self.images_digest,
                                     self.b.manifest.output_dtype, self.s.model_format, family)
        return subject_fingerprint(self.s, self.resolution, model.identity, self.images_digest, RESUME_SETTINGS, family)
