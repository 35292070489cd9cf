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
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl

from dbbatch import faults, signals
from dbbatch.errors import CheckpointError, Preempted, StorageError

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"step-(\d+)\.ckpt$")
# Settings whose change on resume is reported, and which side wins.
RESUME_SETTINGS = {
    "max_steps": "the manifest",
    "learning_rate": "the checkpoint (its optimizer and LR-schedule state are restored)",
    "lr_scheduler": "the checkpoint (its LR-schedule state is restored)",
    "batch_size": "the manifest (the data order after the resume point changes)",
    "gradient_accumulation": "the manifest",
    "train_text_encoder": "nobody: start over with --force",
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
        raise CheckpointError(f"checkpoint {name} cannot be read ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ckpt, dict) or "dbbatch" not in ckpt:
        raise CheckpointError(f"checkpoint {name} was not written by dbbatch; delete it to start over")
    return ckpt["dbbatch"]


def resume_warnings(meta: dict[str, Any], model_identity: str, train: Any, subject_id: str) -> list[str]:
    """Refuse a checkpoint of another base model; describe changed training settings and who wins."""
    from dbbatch.training import CHECKPOINT_FORMAT

    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"subject {subject_id}: stored checkpoint has format {meta.get('format')}, this dbbatch "
                              f"resumes format {CHECKPOINT_FORMAT} only; delete {subject_id}/checkpoints/ or rerun with --force")
    if meta.get("base_model") != model_identity:
        raise CheckpointError(
            f"subject {subject_id}: stored checkpoint was trained from base model {meta.get('base_model')!r}, "
            f"not {model_identity!r}; delete {subject_id}/checkpoints/ or rerun with --force"
        )
    old = meta.get("train", {})
    notes = []
    for key, winner in RESUME_SETTINGS.items():
        if key in old and old[key] != getattr(train, key):
            if key == "train_text_encoder":
                raise CheckpointError(f"subject {subject_id}: train.train_text_encoder changed since the checkpoint; rerun with --force")
            notes.append(f"subject {subject_id}: train.{key} changed since the checkpoint ({old[key]} -> {getattr(train, key)}); {winner} wins")
    return notes


class StoreCheckpoints(pl.Callback):
    """Every `every` optimizer steps, and on SIGTERM, write a checkpoint and mirror it to the store."""

    def __init__(self, storage: Any, remote_dir: str, local_dir: Path, every: int, keep: int, max_steps: int,
                 guard: Optional[Callable[[str], None]] = None):
        self.storage, self.remote_dir, self.local_dir = storage, remote_dir, local_dir
        self.every, self.keep, self.max_steps = every, keep, max_steps
        # The subject's lease check (raises LeaseLost): every step, and before a checkpoint reaches the store.
        self.guard = guard
        self.last_saved: Optional[int] = None
        self.save_seconds: list[float] = []
        self.sizes: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        # DDP ranks get a pickled copy; the lease (a renewal thread) stays in the main process, which renews it.
        return {**self.__dict__, "guard": None}

    def _guard(self, what: str) -> None:
        if self.guard is not None:
            self.guard(what)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._guard("the next training step")
        at_boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        step = trainer.global_step
        requested = signals.requested()
        if trainer.world_size > 1:
            # DDP: saving is collective, so every rank must take the same branch at the same step.
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            # Lightning saw SIGTERM too and would stop after this micro-batch and exit 0 (Lightning #19916),
            # possibly mid gradient-accumulation. Preemption is ours: hold its flag down until a step boundary.
            trainer._signal_connector.received_sigterm = False
            if at_boundary:
                if step != self.last_saved:
                    self.save(trainer, step)
                raise Preempted(f"SIGTERM received; checkpoint at step {step} stored")
            return
        if at_boundary and step % self.every == 0 and step != self.last_saved and step < self.max_steps:
            self.save(trainer, step)

    def save(self, trainer: pl.Trainer, step: int) -> None:
        from dbbatch.storage import join

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
