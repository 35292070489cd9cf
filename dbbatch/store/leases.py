"""Leases: at most one worker works on a subject at a time, coordinated through the output store alone.

A lease is a small JSON object at `<output>/_leases/<subject>/<generation>.json`; the newest generation is
the one in force.
- claim: when there is none, or the newest is released or expired, create generation g+1 with a conditional
  create (S3 `If-None-Match: *`, link(2) locally; `Storage.create_exclusive`). Of two workers racing, one
  creates it and the other reads who won. Taking over an expired lease is the same conditional create, so
  two takers cannot both win.
- renew: a background thread rewrites the holder's own generation with a later expiry every ttl/3 and looks
  for a newer generation (someone took over after the lease had expired).
- check / verify: before every write to the subject's outputs the holder checks that its lease is still
  valid on its own monotonic clock (`check`, no I/O); before the writes that decide the outcome (`_stage.json`,
  `_SUCCESS`, deleting checkpoints, `--force`'s deletion) it also asks the store (`verify`).
- release: the holder marks its generation released, with the outcome (done, failed, preempted).

A holder that died on this machine (SIGKILL, OOM kill: same boot, same pid namespace, its pid gone or
reused by a younger process) is known dead without waiting for its lease to expire; a rerun on the same
machine or in the restarted container of the same pod (same pid namespace only if it is shared) takes over
at once. Elsewhere, expiry is the only evidence.

Why generations rather than one object rewritten with If-Match: a conditional create is the one primitive
that both S3 and local filesystems offer atomically; many S3-compatible stores lack If-Match writes.

Timing: a holder stops writing at `start of its last successful renewal + ttl` (its own monotonic clock); a
taker takes over only after `expires_at + grace` (wall clock; `expires_at` is computed after that renewal
started). As long as the workers' clocks agree within `grace` (10% of the ttl, at least 1 s), a holder never
writes after a taker has started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from dbbatch.core import faults
from dbbatch.core.errors import DbbatchError, LeaseLost
from dbbatch.store.locations import join

log = logging.getLogger(__name__)
LEASE_DIR = "_leases"
DEFAULT_TTL_SECONDS = 120.0
MIN_TTL_SECONDS = 2.0
_GEN_RE = re.compile(r"/(\d{8})\.json$")


# -- pure ----------------------------------------------------------------------------------------------------
def generation_name(generation: int) -> str:
    return f"{generation:08d}.json"


def generation_of(url: str) -> Optional[int]:
    m = _GEN_RE.search(url)
    return int(m.group(1)) if m else None


def grace_seconds(ttl: float) -> float:
    """How long past its expiry a lease is still honoured: the clock skew between workers we tolerate."""
    return max(1.0, 0.1 * ttl)


def is_live(doc: dict[str, Any], now: float) -> bool:
    """Whether the lease `doc` still holds at wall-clock time `now`."""
    if doc.get("released"):
        return False
    return now <= float(doc.get("expires_at", 0)) + grace_seconds(float(doc.get("ttl_seconds", DEFAULT_TTL_SECONDS)))


def failed_since(doc: Optional[dict[str, Any]], since: float) -> bool:
    """The subject's last holder released it as failed after `since`: a worker that started before then does
    not retry it in the same pass (one try per batch; a rerun retries)."""
    return bool(doc and doc.get("released") and doc.get("outcome") == "failed" and float(doc.get("released_at") or 0) >= since)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder_of(doc: dict[str, Any]) -> str:
    """'pod P (host H, pid N, run R)': the worker named in a lease, for messages."""
    h = doc.get("holder", {})
    return f"pod {h.get('pod', '?')} (host {h.get('host', '?')}, pid {h.get('pid', '?')}, run {h.get('run_id', '?')})"


def describe(doc: dict[str, Any]) -> str:
    """'pod P (host H, pid N, run R), lease until T': who holds a lease, for messages."""
    return f"{holder_of(doc)}, lease until {_utc(float(doc.get('expires_at', 0)))}"


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> Optional[str]:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if there is no
    such process or no /proc. With the boot id it names one process for good, where a pid can be reused."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "pid (comm)": state is field 3, starttime 22


def machine_identity() -> dict[str, Optional[str]]:
    """This boot of this machine and this pid namespace: where a pid means the same process as here."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    boot_id = _read_text("/proc/sys/kernel/random/boot_id")
    if faults.other_machine() and boot_id:
        boot_id = "other-" + boot_id
    return {"boot_id": boot_id, "pidns": pidns}


def worker_identity(run_id: str) -> dict[str, Any]:
    host = socket.gethostname()
    # In a pod HOSTNAME is the pod's name; POD_NAME (downward API) wins where a pod sets its hostname.
    return {"pod": os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or host, "host": host, "pid": os.getpid(),
            "run_id": run_id, "started": process_start(os.getpid()), **machine_identity()}


def holder_is_dead(holder: dict[str, Any], here: dict[str, Optional[str]], start_of=process_start) -> bool:
    """Whether the worker `holder` (a lease's holder) is known dead: it ran in this boot and pid namespace
    (`here`) and its pid is gone or now another process. False whenever that cannot be told from here."""
    if not here.get("boot_id") or not here.get("pidns"):
        return False
    if holder.get("boot_id") != here["boot_id"] or holder.get("pidns") != here["pidns"] or not holder.get("started"):
        return False
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return start_of(pid) != holder["started"]


# -- a held lease ----------------------------------------------------------------------------------------------
class Lease:
    """A lease this worker holds on one subject, renewed in the background until released."""

    def __init__(self, storage: Any, folder: str, doc: dict[str, Any], valid_until: float):
        self.storage, self.folder, self.doc = storage, folder, doc
        self.subject = doc["subject"]
        self.ttl = float(doc["ttl_seconds"])
        self.url = join(folder, generation_name(doc["generation"]))
        self._valid_until = valid_until  # monotonic
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # a renewal and the release never interleave
        self.released = False

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.subject}", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.renew()

    def stop_own_renewal(self) -> None:
        """Stop this lease's own renewal thread (a LeaseGroup renews it from now on)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
            self._stop.clear()

    def renew(self) -> None:
        with self._lock:
            if not self.released and self._lost is None:
                self._renew()

    def _renew(self) -> None:
        started = time.monotonic()
        try:
            newer = self._newer()
            if newer is not None:
                self._lost = f"taken over by {describe(newer)}"
                log.error("%s: lease lost: %s; stopping work on it", self.subject, self._lost)
                self._stop.set()
                return
            now = time.time()
            doc = {**self.doc, "renewed_at": now, "expires_at": now + self.ttl}
            self.storage.write_json(self.url, doc)
            self.doc, self._valid_until = doc, started + self.ttl
        except DbbatchError as e:
            left = self._valid_until - time.monotonic()
            log.warning("%s: lease not renewed (%s); %.0fs left before work on it stops", self.subject, e, max(0.0, left))

    def _newer(self) -> Optional[dict[str, Any]]:
        gens = sorted(g for g in map(generation_of, self.storage.list_files(self.folder, fresh=True)) if g is not None)
        if gens and gens[-1] > self.doc["generation"]:
            return _read(self.storage, join(self.folder, generation_name(gens[-1]))) or {}
        return None

    def check(self, what: str) -> None:
        """Raise LeaseLost unless the lease is valid now (no I/O: the renewal thread keeps the state)."""
        if self._lost is None and time.monotonic() > self._valid_until:
            self._lost = f"not renewed for {self.ttl:.0f}s (output store unreachable?)"
        if self._lost is not None:
            raise LeaseLost(f"subject {self.subject}: lease lost ({self._lost}); stopped before {what}, nothing written; "
                            "the worker holding it now finishes the subject")

    def verify(self, what: str) -> None:
        """Confirm in the store that no other worker has taken the subject over, then `check`."""
        if self._lost is None:
            newer = self._newer()
            if newer is not None:
                self._lost = f"taken over by {describe(newer)}"
            elif (_read(self.storage, self.url) or {}).get("token") != self.doc["token"]:
                self._lost = f"lease object {self.url} was removed or replaced"
        self.check(what)

    def release(self, outcome: str, message: Optional[str] = None, error_class: Optional[str] = None) -> None:
        """Stop renewing and mark the lease released with `outcome` (done | failed | preempted | released)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self.released = True
            if self._lost is not None:
                return  # another worker holds it now: its lease is not ours to touch
            self._write_release(outcome, message, error_class)

    def _write_release(self, outcome: str, message: Optional[str], error_class: Optional[str]) -> None:
        doc = {**self.doc, "released": True, "outcome": outcome, "message": message, "error_class": error_class,
               "released_at": time.time()}
        try:
            self.storage.write_json(self.url, doc)
            self.doc = doc
        except DbbatchError as e:
            log.warning("%s: could not release the lease (%s); other workers take the subject over after it expires", self.subject, e)


class LeaseGroup:
    """The leases of a cohort's members (packing), renewed together by one thread every third of the shortest
    ttl; each is still checked and released on its own (as its member is published)."""

    def __init__(self, leases: list[Lease]):
        self.leases = leases
        for lease in leases:
            lease.stop_own_renewal()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-cohort", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        ttl = min(lease.ttl for lease in self.leases)
        while not self._stop.wait(ttl / 3):
            for lease in self.leases:
                lease.renew()
            if all(lease.released for lease in self.leases):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Claim:
    """The answer to a claim: `lease` when this worker holds the subject now; otherwise `current` is the lease
    in force (held by another worker)."""

    lease: Optional[Lease]
    current: Optional[dict[str, Any]]


class Leases:
    """Claims subjects' leases in one output store for this worker."""

    def __init__(self, storage: Any, output: str, run_id: str, ttl: float = DEFAULT_TTL_SECONDS):
        if ttl < MIN_TTL_SECONDS:
            raise ValueError(f"lease ttl must be at least {MIN_TTL_SECONDS}s")
        self.storage, self.output, self.ttl = storage, output, float(ttl)
        self.holder = worker_identity(run_id)
        self.machine = machine_identity()
        self.started_at = time.time()

    def folder(self, subject_id: str) -> str:
        return join(self.output, LEASE_DIR, subject_id)

    def _generations(self, subject_id: str) -> list[int]:
        return sorted(g for g in map(generation_of, self.storage.list_files(self.folder(subject_id), fresh=True)) if g is not None)

    def current(self, subject_id: str) -> Optional[dict[str, Any]]:
        """The newest lease document of a subject (released, expired or live), or None if it never had one."""
        gens = self._generations(subject_id)
        if not gens:
            return None
        return _read(self.storage, join(self.folder(subject_id), generation_name(gens[-1]))) or {"generation": gens[-1]}

    def claim(self, subject_id: str, unless_failed_since: Optional[float] = None) -> Claim:
        """Take the subject's lease if no live worker holds it. With `unless_failed_since`, a subject released
        as failed after that time is not taken either (the caller reports it instead of retrying it)."""
        folder = self.folder(subject_id)
        for _ in range(5):
            gens = self._generations(subject_id)
            current = None
            if gens:
                current = _read(self.storage, join(folder, generation_name(gens[-1])))
                if current is None:
                    log.warning("%s: lease %s is unreadable; treating it as expired", subject_id,
                                join(folder, generation_name(gens[-1])))
                elif is_live(current, time.time()):
                    if not holder_is_dead(current.get("holder") or {}, self.machine):
                        return Claim(None, current)
                    log.warning("%s: the lease holder %s died (its process is gone); taking the subject over now",
                                subject_id, holder_of(current))
                elif unless_failed_since is not None and failed_since(current, unless_failed_since):
                    return Claim(None, current)
            generation = gens[-1] + 1 if gens else 0
            now = time.time()
            doc = {"subject": subject_id, "generation": generation, "token": uuid.uuid4().hex, "holder": self.holder,
                   "ttl_seconds": self.ttl, "acquired_at": now, "renewed_at": now, "expires_at": now + self.ttl,
                   "released": False, "outcome": None, "message": None, "released_at": None}
            started = time.monotonic()
            url = join(folder, generation_name(generation))
            created = self.storage.create_exclusive(url, json.dumps(doc, indent=2, sort_keys=True).encode())
            if not created and (_read(self.storage, url) or {}).get("token") != doc["token"]:
                continue  # another worker created this generation first: read who holds it now
            if current is not None and not current.get("released") and not is_live(current, now):
                log.warning("%s: took over the expired lease of %s", subject_id, describe(current))
            for old in gens[:-1]:  # keep the previous generation as a record of who had it last
                self.storage.remove(join(folder, generation_name(old)))
            return Claim(Lease(self.storage, folder, doc, started + self.ttl).start(), current)
        return Claim(None, self.current(subject_id))


def _read(storage: Any, url: str) -> Optional[dict[str, Any]]:
    """The lease document at `url`; None if it is missing or not a lease (corrupt). Storage failures raise:
    a lease that cannot be read because of an outage must not look expired."""
    try:
        doc = storage.read_json(url)
    except ValueError:  # not JSON
        return None
    return doc if isinstance(doc, dict) and "generation" in doc else None
