"""What a batch run is asked to do (RunOptions) and what became of each subject (SubjectResult)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional


@dataclass
class SubjectResult:
    id: str
    status: str  # succeeded | skipped | failed | preempted
    output: str
    steps: int = 0
    final_loss: Optional[float] = None
    seconds: float = 0.0
    error_class: Optional[str] = None
    message: Optional[str] = None
    flags: list[str] = field(default_factory=list)  # why its published step needs a human (evaluation.flag_*)


@dataclass
class RunOptions:
    output: str
    prior_cache: str
    work_dir: Path
    force: bool = False
    debug: bool = False
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6])
    leases: bool = True  # False: --no-leases (an output that cannot hold one; the user accepted the risk)
    lease_seconds: float = 120.0
    poll_seconds: Optional[float] = None  # how often to look at subjects leased by others; default ttl/4, <= 10 s


def lease_outcome(result: Optional[SubjectResult]) -> tuple[str, Optional[str], Optional[str]]:
    """What a lease is released with after `result` (None: the work stopped before a result)."""
    outcome = {"succeeded": "done", "skipped": "done", "failed": "failed", "preempted": "preempted"}
    if result is None:
        return "released", None, None
    return outcome.get(result.status, "released"), result.message, result.error_class
