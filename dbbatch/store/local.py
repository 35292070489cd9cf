"""Local files written atomically: a temporary name in the same folder, then a rename (or an exclusive create)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from dbbatch.core import faults


def atomic_local(dest: Path, fill: Callable[[Any], None]) -> None:
    """`fill` a temporary file beside `dest`, fsync, rename: readers see the old file or the new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            faults.on_upload(dest)
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_local_write(dest: Path, data: bytes) -> None:
    atomic_local(dest, lambda fh: fh.write(data))


def exclusive_local_write(dest: Path, data: bytes) -> bool:
    """Write a complete temporary file, then link(2) it to `dest`: fails if `dest` exists, and `dest` never
    appears half-written. Filesystems without hard links fall back to O_CREAT|O_EXCL (atomic, but a reader
    may briefly see a short file; lease readers treat an unparsable lease as one being written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        atomic_local_write(tmp, data)
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        try:
            fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_local_copy(src: Path, dest: Path) -> None:
    """Copy in 8 MiB chunks, so a multi-GB file is never read whole."""

    def copy(fout: Any) -> None:
        with open(src, "rb") as fin:
            while chunk := fin.read(8 * 1024 * 1024):
                fout.write(chunk)

    atomic_local(dest, copy)
