"""Progress for long work: rich bars on a terminal, a plain log line every few seconds elsewhere.

A pod's log or CI is not a terminal: there, redrawing bars would flood the log, so each task prints one line
(`rex train 30/60 loss=0.1234 2.1 it/s ETA 14s`) at most every `interval` seconds, and once when done.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

log = logging.getLogger("dbbatch.progress")


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _fmt_amount(v: float, unit: str) -> str:
    if unit == "B":
        return f"{v / 2**20:.1f}MiB"
    return f"{int(v)}"


class Task:
    def __init__(self, reporter: "Reporter", description: str, total: float, unit: str):
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.value = 0.0
        self.fields: dict[str, Any] = {}
        self.started = time.monotonic()
        self._last_line = self.started
        self._rich_id: Optional[int] = None
        if reporter._progress is not None:
            self._rich_id = reporter._progress.add_task(description, total=total, extra="")

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.set(self.value + n, **fields)

    def set(self, value: float, **fields: Any) -> None:
        self.value = value
        self.fields.update(fields)
        if self._rich_id is not None:
            extra = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
            self.reporter._progress.update(self._rich_id, completed=value, extra=extra)
        else:
            now = time.monotonic()
            if now - self._last_line >= self.reporter.interval:
                self._last_line = now
                log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.value / elapsed
        parts = [self.description, f"{_fmt_amount(self.value, self.unit)}/{_fmt_amount(self.total, self.unit)}"]
        parts += [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items()]
        if self.unit == "B":
            parts.append(f"{rate / 2**20:.1f} MiB/s")
        else:
            parts.append(f"{rate:.2f} {self.unit}/s")
        if 0 < self.value < self.total and rate > 0:
            parts.append(f"ETA {_fmt_seconds((self.total - self.value) / rate)}")
        return " ".join(parts)

    def close(self) -> None:
        if self._rich_id is not None:
            self.reporter._progress.remove_task(self._rich_id)
            self._rich_id = None
        elif self.value > 0 and time.monotonic() - self.started >= 0.5:
            log.info(self.line() + f" done in {_fmt_seconds(time.monotonic() - self.started)}")

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Reporter:
    """Starts progress tasks; `interactive` (a terminal) picks rich bars over periodic log lines."""

    def __init__(self, interactive: Optional[bool] = None, interval: float = 5.0):
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.interval = interval
        self._progress: Any = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"), transient=True,
            )
            self._progress.start()

    def start(self, description: str, total: float, unit: str = "it") -> Task:
        return Task(self, description, total, unit)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
