"""Fault injection for tests, off unless DBBATCH_FAULTS is set. Never used in production paths otherwise.

DBBATCH_FAULTS is a ';'-separated list:
  pause_at_step=N      before optimizer step N+1 starts, touch $DBBATCH_FAULT_MARKER and wait until SIGTERM or
                       until `$DBBATCH_FAULT_MARKER.continue` exists (tests then send SIGKILL or SIGTERM at a known
                       step, or take the subject's lease away meanwhile)
  fail_train=ID        raise a simulated CUDA out-of-memory error (torch.OutOfMemoryError, what CUDA raises) in
                       subject ID's first training step
  disk_full_checkpoint[=STEP]
                       when writing a checkpoint (only the one of step STEP, if given), raise ENOSPC after
                       writing part of the file
  sigterm_at_checkpoint=STEP
                       while writing checkpoint STEP (still its `.part` file), send this process SIGTERM (a
                       preemption that lands mid-save)
  disk_full_model=ID   when writing subject ID's fine-tuned model folder, write part of the UNet file and raise
                       the error safetensors raises on a full disk
  pause_at_upload=NAME when writing a file named NAME to a local output (Storage.upload, write_bytes), while it
                       is still its temporary `.NAME.<hex>.part`: write its path to $DBBATCH_FAULT_MARKER and
                       wait until SIGTERM (tests then send SIGKILL mid-upload)
  pause_at_publish=P   at publish point P of a subject (see on_publish), write P to $DBBATCH_FAULT_MARKER and
                       wait until the file `$DBBATCH_FAULT_MARKER.continue` exists or SIGTERM arrives (tests
                       cut the storage endpoint meanwhile, then let publishing go on)
  nan_at=ID@STEP       subject ID's training examples become NaN at step STEP (0-based), as diverging
                       weights or a corrupt latent would make them
  packing_variant=V    the packed trainer makes a known mistake: batch_mean (one mean over the packed batch) or
                       global_clip (one gradient clip over all subjects); the equivalence test's negative controls
  other_machine        this worker presents itself as running on another machine (another boot id), as pods
                       on two nodes are: it cannot tell that a lease holder on this machine died, and waits
                       for the lease to expire
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path
from typing import Optional


def _faults() -> dict[str, str]:
    raw = os.environ.get("DBBATCH_FAULTS", "")
    out = {}
    for item in filter(None, (p.strip() for p in raw.split(";"))):
        k, _, v = item.partition("=")
        out[k] = v
    return out


_current_subject: Optional[str] = None


def set_subject(subject_id: Optional[str]) -> None:
    global _current_subject
    _current_subject = subject_id


def other_machine() -> bool:
    return "other_machine" in _faults()


def on_train_step(step: int) -> None:
    f = _faults()
    if not f:
        return
    if "fail_train" in f and f["fail_train"] == _current_subject:
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated by DBBATCH_FAULTS)")
    if "pause_at_step" in f and int(f["pause_at_step"]) == step:
        marker = os.environ.get("DBBATCH_FAULT_MARKER")
        _pause(str(step), go_on=Path(marker + ".continue") if marker else None)


def packing_variant() -> str:
    """The packed trainer's deliberate mistake (packing_variant), or ''."""
    return _faults().get("packing_variant", "")


def nan_member(step: int) -> Optional[str]:
    """The subject whose examples are made NaN at this step (nan_at), or None."""
    spec = _faults().get("nan_at")
    if not spec:
        return None
    subject, _, at = spec.rpartition("@")
    return subject if int(at) == step else None


def on_checkpoint_write(path: Path) -> None:
    f = _faults()
    step = re.search(r"step-(\d+)", path.name)
    if "sigterm_at_checkpoint" in f and step and int(step.group(1)) == int(f["sigterm_at_checkpoint"]):
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
    if "disk_full_checkpoint" in f and (not f["disk_full_checkpoint"] or (step and int(step.group(1)) == int(f["disk_full_checkpoint"]))):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def on_model_write(folder: Path) -> None:
    if _faults().get("disk_full_model") != _current_subject or folder.name != "model.tmp":
        return  # only the subject's own model (the built-in base model is written the same way)
    from safetensors import SafetensorError

    part = folder / "unet" / "diffusion_pytorch_model.safetensors"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\0" * 4096)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def on_upload(dest: Path) -> None:
    """Called with a local destination whose data is still in its temporary file."""
    f = _faults()
    if not f or f.get("pause_at_upload") != dest.name:
        return
    _pause(str(dest))


def on_publish(point: str) -> None:
    """A named moment of publishing a subject's outputs. Points: 'config' (the model, _stage.json, samples
    and logs are stored; config.yaml, metrics.json and _SUCCESS are not), 'success' (_SUCCESS is written; the
    stored checkpoints and the local scratch folder are not removed yet)."""
    if _faults().get("pause_at_publish") != point or not os.environ.get("DBBATCH_FAULT_MARKER"):
        return
    _pause(point, go_on=Path(os.environ["DBBATCH_FAULT_MARKER"] + ".continue"))


def _pause(what: str, go_on: Optional[Path] = None) -> None:
    """Write `what` to $DBBATCH_FAULT_MARKER, then wait (at most 300 s) until SIGTERM/SIGINT arrives or the file
    `go_on` exists: the test that set the fault acts meanwhile (kills the process, cuts the storage, ...)."""
    from dbbatch.core import signals

    marker = os.environ.get("DBBATCH_FAULT_MARKER")
    if marker:
        Path(marker).write_text(what)
    deadline = time.monotonic() + 300
    while not signals.requested() and not (go_on is not None and go_on.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
