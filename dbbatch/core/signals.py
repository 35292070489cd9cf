"""Preemption: SIGTERM (what Kubernetes sends) asks the worker to save state and exit 143; SIGINT (Ctrl-C)
does the same and exits 130, so an interrupted run also stores its checkpoint and its report.

The handler only records the request; the training loop checks it at every optimizer-step boundary, the
other stages between batches of work. Lightning registers its own SIGTERM handler during `fit` and keeps
ours in the chain, so this flag is seen there too.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional

from dbbatch.core.errors import Preempted

_requested_at: Optional[float] = None
_signal_name = "SIGTERM"  # the first stop signal received
_watched: Any = None  # in a DDP rank: the main process's SIGTERM, as a multiprocessing Event


def _on_sigterm(signum: int, frame: Any) -> None:
    global _requested_at, _signal_name
    if _requested_at is None:
        _requested_at = time.monotonic()
        _signal_name = signal.Signals(signum).name


def install() -> None:
    # SIGINT too: Python's default turns it into KeyboardInterrupt, which Lightning swallows ("graceful
    # shutdown", no checkpoint) before the run exits 1 without a report.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)


def watch(event: Any) -> None:
    """Also count `event` (set by the main process on SIGTERM) as a request: a spawned DDP rank is not PID 1
    and does not receive the pod's SIGTERM itself."""
    global _watched
    _watched = event


def requested() -> bool:
    global _requested_at
    if _requested_at is None and _watched is not None and _watched.is_set():
        _requested_at = time.monotonic()
    return _requested_at is not None


def name() -> str:
    """The stop signal received ("SIGTERM" or "SIGINT")."""
    return _signal_name


def exit_code() -> int:
    """What the process exits with after stopping for it: 128 + the signal number (143 or 130)."""
    return 128 + int(getattr(signal, _signal_name))


def seconds_since_request() -> float:
    return 0.0 if _requested_at is None else time.monotonic() - _requested_at


def check(where: str) -> None:
    """Raise Preempted if SIGTERM arrived; call between units of work that are already stored."""
    if requested():
        raise Preempted(f"{_signal_name} received; stopped {where}")
