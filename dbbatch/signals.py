"""Preemption: SIGTERM (what Kubernetes sends) asks the worker to save state and exit 143.

The handler only records the request; the training loop checks it at every optimizer-step boundary, the
other stages between batches of work. Lightning registers its own SIGTERM handler during `fit` and keeps
ours in the chain, so this flag is seen there too.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional

from dbbatch.errors import Preempted

_requested_at: Optional[float] = None


def _on_sigterm(signum: int, frame: Any) -> None:
    global _requested_at
    if _requested_at is None:
        _requested_at = time.monotonic()


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    return _requested_at is not None


def seconds_since_request() -> float:
    return 0.0 if _requested_at is None else time.monotonic() - _requested_at


def check(where: str) -> None:
    """Raise Preempted if SIGTERM arrived; call between units of work that are already stored."""
    if _requested_at is not None:
        raise Preempted(f"SIGTERM received; stopped {where}")
