"""Resumable checkpoints mirrored to `<output>/<subject>/checkpoints/`.

A checkpoint holds only what resume needs: the trainable weights (the LightningModule holds nothing else),
optimizer and LR-scheduler state, loop counters with the StatefulDataLoader position, and our RNG states.
It is written locally under a temporary name, renamed, uploaded, and only then are older ones pruned, so
a crash or a full disk at any moment leaves the previous checkpoint intact. Lightning's `ckpt_path="last"`
cannot see object stores (Lightning #18261), so the latest one is found here by name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl

from dbbatch.core import faults, signals
from dbbatch.core.errors import CheckpointError, LeaseLost, Preempted, StorageError

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"step-(\d+)\.ckpt$")
# Settings that may change between attempts: a change is reported with which side wins and the resume goes on.
# Every other setting that decides the result is in the checkpoint's fingerprint (store/fingerprints.py): a change
# there restarts training. max_steps below the checkpoint's step restarts too (see pick_resume).
RESUME_SETTINGS = {
    "max_steps": "the manifest",
    "learning_rate": "the checkpoint (its optimizer and LR-schedule state are restored)",
    "lr_scheduler": "the checkpoint (its LR-schedule state is restored)",
    "batch_size": "the manifest (the data order after the resume point changes)",
    "gradient_accumulation": "the manifest",
    "seed": "the checkpoint (its RNG states are restored)",
}


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.ckpt"


def step_of(url: str) -> Optional[int]:
    m = NAME_RE.search(url)
    return int(m.group(1)) if m else None


def latest(urls: list[str]) -> Optional[str]:
    steps = [(step_of(u), u) for u in urls if step_of(u) is not None]
    return max(steps)[1] if steps else None


def prunable(urls: list[str], keep: int) -> list[str]:
    """The checkpoints beyond the newest `keep`, oldest first."""
    ordered = sorted((step_of(u), u) for u in urls if step_of(u) is not None)
    return [u for _, u in ordered[: max(0, len(ordered) - keep)]]


def read_meta(path: Path, source: Optional[str] = None) -> dict[str, Any]:
    """dbbatch's part of a checkpoint, loaded with weights_only=True: nothing from storage is unpickled.
    `source` (the stored URL) names the file in errors."""
    import torch

    name = source or path.name
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"checkpoint {name} cannot be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "dbbatch" not in ckpt:
        raise CheckpointError(f"checkpoint {name} was not written by dbbatch")
    return ckpt["dbbatch"]


def resume_warnings(meta: dict[str, Any], train: Any, subject_id: str) -> list[str]:
    """Describe the settings that changed since the checkpoint but may change (RESUME_SETTINGS), and who wins."""
    old = meta.get("train", {})
    return [f"subject {subject_id}: train.{key} changed since the checkpoint ({old[key]} -> {getattr(train, key)}); {winner} wins"
            for key, winner in RESUME_SETTINGS.items() if key in old and old[key] != getattr(train, key)]


def restart_reason(meta: dict[str, Any], fingerprint: dict[str, Any], max_steps: int, step: int) -> Optional[str]:
    """Why a readable checkpoint must not be resumed (None: resume it).

    max_steps policy: a checkpoint at or below the new max_steps resumes and trains up to it (the manifest
    wins); one past it restarts from step 0, so the published model is always trained for exactly
    train.max_steps steps, as config.yaml and metrics.json say."""
    from dbbatch.store.fingerprints import changes
    from dbbatch.train.module import CHECKPOINT_FORMAT

    if meta.get("format") != CHECKPOINT_FORMAT:
        return f"it has checkpoint format {meta.get('format')}, this dbbatch resumes format {CHECKPOINT_FORMAT} only"
    changed = changes(meta.get("fingerprint", {}), fingerprint)
    if changed:
        return f"changed since it was written: {', '.join(changed)}"
    if step > max_steps:
        return f"train.max_steps is {max_steps} now, below its step {step}"
    return None


@dataclass
class Resume:
    url: str  # the stored checkpoint
    local: Path  # its verified local copy
    step: int
    meta: dict[str, Any]


def pick_resume(storage: Any, remote_dir: str, local_dir: Path, fingerprint: dict[str, Any], train: Any,
                subject_id: str) -> Optional[Resume]:
    """The newest stored checkpoint that can be read and matches this run, or None (train from step 0).

    An unreadable checkpoint (truncated upload, bit rot, a file dbbatch did not write) is reported and removed,
    and the next older one is tried. A readable one that does not match (restart_reason) means training
    restarts from step 0: then every stored checkpoint of the subject is removed, since they belong to another
    configuration, and pruning by step would otherwise delete the new run's checkpoints in favour of theirs."""
    stored = sorted(((step_of(u), u) for u in storage.list_files(remote_dir) if step_of(u) is not None), reverse=True)
    unreadable: list[str] = []
    for step, url in stored:
        local = storage.fetch(url, local_dir / url.rsplit("/", 1)[-1])
        try:
            meta = read_meta(local, url)
        except CheckpointError as e:
            log.warning("%s: %s; removing it and trying the next older checkpoint", subject_id, e)
            unreadable.append(url)
            local.unlink(missing_ok=True)
            continue
        reason = restart_reason(meta, fingerprint, train.max_steps, step)
        if reason:
            log.warning("%s: not resuming checkpoint %s: %s; training restarts from step 0 (the stored checkpoints "
                        "of %s are removed)", subject_id, url, reason, subject_id)
            for _, other in stored:
                storage.remove(other)
            shutil.rmtree(local_dir, ignore_errors=True)
            return None
        for note in resume_warnings(meta, train, subject_id):
            log.warning(note)
        for bad in unreadable:
            storage.remove(bad)
        if unreadable:
            log.warning("%s: fell back to the older checkpoint %s (step %d)", subject_id, url, step)
        return Resume(url, local, step, meta)
    if unreadable:
        for bad in unreadable:
            storage.remove(bad)
        log.warning("%s: no readable checkpoint left in %s; training restarts from step 0", subject_id, remote_dir)
    return None


class StoreCheckpoints(pl.Callback):
    """Every `every` optimizer steps, and on SIGTERM, write a checkpoint and mirror it to the store."""

    def __init__(self, storage: Any, remote_dir: str, local_dir: Path, every: int, keep: int, max_steps: int,
                 guard: Optional[Callable[[str], None]] = None):
        self.storage, self.remote_dir, self.local_dir = storage, remote_dir, local_dir
        self.every, self.keep, self.max_steps = every, keep, max_steps
        # The subject's lease check (raises LeaseLost): every step, and before a checkpoint reaches the store.
        self.guard = guard
        # In DDP ranks, which cannot hold the lease: an Event the main process sets when it loses the lease
        # (ddp.SpawnLauncher); the ranks agree on it at a step boundary and stop, writing nothing more.
        self.fence: Any = None
        self.last_saved: Optional[int] = None
        self.save_seconds: list[float] = []
        self.sizes: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        # DDP ranks get a pickled copy; the lease (a renewal thread) stays in the main process, which renews it.
        return {**self.__dict__, "guard": None}

    def _guard(self, what: str) -> None:
        if self.guard is not None:
            self.guard(what)
        if self.fence is not None and self.fence.is_set():
            raise LeaseLost(f"lease lost (the worker's main process saw it); this training process stopped before {what}, "
                            "nothing written; the worker holding it now finishes the subject")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.fence is not None and trainer.world_size > 1:
            # DDP: every rank stops at the same step (a rank stopping alone would leave the others in a collective)
            if trainer.strategy.reduce_boolean_decision(self.fence.is_set(), all=False):
                self.fence.set()
        self._guard(f"step {trainer.global_step + 1}")
        at_boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        step = trainer.global_step
        requested = self._stop_requested(trainer)
        if not requested and at_boundary and step % self.every == 0 and step != self.last_saved and step < self.max_steps:
            self.save(trainer, step)
            # A stop signal that came while this checkpoint was written or uploaded: Lightning saw it too and
            # would end `fit` right after this hook with its SIGTERMException, a SystemExit that exits 0.
            requested = self._stop_requested(trainer)
        if requested:
            # Lightning saw SIGTERM too and would stop after this micro-batch and exit 0 (Lightning #19916),
            # possibly mid gradient-accumulation. Preemption is ours: hold its flag down until a step boundary.
            trainer._signal_connector.received_sigterm = False
            if at_boundary:
                if step != self.last_saved:
                    self.save(trainer, step)
                raise Preempted(f"{signals.name()} received; checkpoint at step {step} stored")

    @staticmethod
    def _stop_requested(trainer: pl.Trainer) -> bool:
        requested = signals.requested()
        if trainer.world_size > 1:
            # DDP: saving is collective, so every rank must take the same branch at the same step.
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def save(self, trainer: pl.Trainer, step: int) -> None:
        from dbbatch.store.locations import join

        started = time.monotonic()
        name = checkpoint_name(step)
        if not trainer.is_global_zero:
            # DDP: trainer.save_checkpoint is collective and rank 0 alone writes the file; other ranks only join.
            trainer.save_checkpoint(self.local_dir / f".{name}.part", weights_only=False)
            self.last_saved = step
            return
        self.local_dir.mkdir(parents=True, exist_ok=True)
        local = self.local_dir / name
        tmp = self.local_dir / f".{name}.part"
        try:
            faults.on_checkpoint_write(tmp)
            trainer.save_checkpoint(tmp, weights_only=False)  # False: optimizer and loop state too
            os.replace(tmp, local)
        except OSError as e:
            raise StorageError(f"cannot write checkpoint {name} in {self.local_dir} ({e.strerror or e}); checkpoints already "
                               f"stored in {self.remote_dir} are intact: free space in the work dir (--work-dir) and rerun "
                               "to resume") from e
        finally:
            tmp.unlink(missing_ok=True)
        self._guard(f"storing checkpoint {name}")
        self.storage.upload(local, join(self.remote_dir, name))
        stored = self.storage.list_files(self.remote_dir)
        for old in prunable(stored, self.keep):
            self.storage.remove(old)
        for other in self.local_dir.glob("step-*.ckpt"):  # the store keeps history; local scratch only the newest
            if other != local:
                other.unlink(missing_ok=True)
        self.last_saved = step
        self.sizes.append(local.stat().st_size)
        self.save_seconds.append(time.monotonic() - started)
        log.info("checkpoint %s stored (%.1f MiB, %.2fs)", join(self.remote_dir, name), local.stat().st_size / 2**20, self.save_seconds[-1])
