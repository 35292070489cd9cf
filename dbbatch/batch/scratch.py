"""Local scratch: one folder per worker process under the work dir, removed when its batch ends or it died."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)
SCRATCH_COPIES = ("resume", "checkpoints", "trained", "model", "model.tmp", "lora")


def drop_scratch_copies(work: Path) -> None:
    """After a subject failed: drop its scratch files that are copies of stored files or are useless to a
    rerun (checkpoint copies, the model written for upload), so a rerun on the same small disk has the room
    this attempt had. The TensorBoard logs stay: they are uploaded only when the subject is done."""
    for name in SCRATCH_COPIES:
        shutil.rmtree(work / name, ignore_errors=True)


def _host_tag() -> str:
    """This host's name with no '-' in it, so `<host>-<pid>-<run id>` splits back into its parts."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())


def scratch_dir(work_dir: Path, run_id: str) -> Path:
    """`<work_dir>/scratch/<host>-<pid>-<run id>`: this process's scratch, removed when the batch ends."""
    return work_dir / "scratch" / f"{_host_tag()}-{os.getpid()}-{run_id}"


def remove_orphan_scratch(work_dir: Path) -> None:
    """Remove the scratch of dead workers of this host (SIGKILLed, OOM-killed): a rerun on a small volume must
    not find its disk full of a dead run's checkpoint copies. Live pids (possibly reused) are left alone."""
    host = _host_tag()
    root = work_dir / "scratch"
    for folder in root.glob(f"{host}-*-*") if root.is_dir() else []:
        pid = folder.name[len(host) + 1 :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing the scratch of dead worker pid %s: %s", pid, folder)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
