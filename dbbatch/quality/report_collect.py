"""What the batch report knows of each subject, read from the output store only (one Entry per subject).

A subject is listed once: done (`_SUCCESS`), else as its newest run record in `_runs/` left it (failed with its
error line, preempted, pending). Sweep variants are grouped by their base subject (`sweep_groups`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from dbbatch.config.metric_names import METRICS
from dbbatch.config.sweeps import SEPARATOR, is_variant_id, valid_variant_id
from dbbatch.core.errors import DbbatchError
from dbbatch.quality.evaluation import selection_score
from dbbatch.store.locations import join, redact

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One subject as the report shows it (summary.json's rows)."""

    id: str
    status: str  # succeeded | failed | preempted | pending
    flagged: bool = False
    flags: list[str] = field(default_factory=list)
    error: Optional[str] = None  # the one-line error of a failed subject
    error_class: Optional[str] = None
    scores: dict[str, Optional[float]] = field(default_factory=dict)  # at the published step
    baseline: dict[str, Optional[float]] = field(default_factory=dict)  # the base model's
    steps: Optional[int] = None
    published_step: Optional[int] = None
    best_step: Optional[int] = None
    select_by: Any = None
    method: Optional[str] = None
    class_noun: Optional[str] = None
    token: Optional[str] = None
    seconds: Optional[float] = None
    final_loss: Optional[float] = None
    output: Optional[str] = None
    run_id: Optional[str] = None
    cohort: Optional[str] = None
    images: dict[str, str] = field(default_factory=dict)  # grid / photos / curves -> path relative to the page
    loss_curve: list[float] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    sweep_of: Optional[str] = None  # the subject this one is a sweep variant of
    swept: dict[str, Any] = field(default_factory=dict)  # dotted setting path -> this variant's value

    @property
    def attention(self) -> int:
        """0: flagged, 1: not done (failed, preempted, pending), 2: fine. The page's first sort key."""
        return 0 if self.flagged else 1 if self.status != "succeeded" else 2


def read_json(storage: Any, url: str) -> Optional[Any]:
    try:
        return storage.read_json(url)
    except DbbatchError as e:
        log.warning("report: cannot read %s: %s", url, e)
        return None


def run_records(storage: Any, output: str) -> list[dict[str, Any]]:
    """Every stored run record, oldest first (run ids begin with their UTC start time)."""
    records = []
    for url in storage.list_files(join(output, "_runs"), fresh=True):  # other shards' records, not a cached listing
        if url.endswith(".json") and isinstance(record := read_json(storage, url), dict):
            records.append(record)
    return sorted(records, key=lambda r: str(r.get("run_id", "")))


def collect(storage: Any, output: str, subject_ids: Optional[list[str]] = None) -> list[Entry]:
    """Every subject the store knows (its folder or a run record names it; plus `subject_ids`, a manifest's,
    listed as pending when nothing is stored), each once, in name order."""
    runs = run_records(storage, output)
    last: dict[str, tuple[dict[str, Any], str]] = {}  # id -> (newest record of it that is not 'skipped', run id)
    for record in runs:
        for row in record.get("subjects") or []:
            if isinstance(row, dict) and isinstance(row.get("id"), str) and row.get("status") != "skipped":
                last[row["id"]] = (row, str(record.get("run_id")))
    folders = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_dirs(output, fresh=True)}
    from dbbatch.config.ids import SUBJECT_ID_RE

    # a run record is anyone's to write: only names that can be subject ids become paths of the report
    last = {i: row for i, row in last.items() if SUBJECT_ID_RE.match(i) or valid_variant_id(i)}
    ids = sorted({i for i in folders if not i.startswith(("_", "."))} | set(last) | set(subject_ids or []))
    return [entry_of(storage, output, sid, last.get(sid)) for sid in ids]


STATUSES = ("succeeded", "failed", "preempted", "pending")


def _num(v: Any) -> Optional[float]:
    """A finite number from a stored file, else None: what the page and the plots may show as a number."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _step(v: Any) -> Optional[int]:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _text(v: Any) -> Optional[str]:
    return None if v is None else str(v)


def _metrics_of(point: Any) -> dict[str, Optional[float]]:
    return {m: _num(point.get(m)) for m in METRICS} if isinstance(point, dict) else {}


def _select_by(v: Any) -> Any:
    """A stored select_by as evaluation.selection_score takes it (a metric name, or metric -> finite weight),
    else None: the sweep table ranks variants with it."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and v and all(isinstance(k, str) and _num(w) is not None for k, w in v.items()):
        return dict(v)
    return None


def _setting(v: Any) -> bool:
    """Whether a stored swept value is one a setting can have (text, a finite number, a boolean, null): a list
    or a mapping where one value belongs is dropped, and NaN would make summary.json invalid JSON."""
    return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _swept(v: Any) -> dict[str, Any]:
    return {k: x for k, x in v.items() if isinstance(k, str) and _setting(x)} if isinstance(v, dict) else {}


def entry_of(storage: Any, output: str, sid: str, last: Optional[tuple[dict[str, Any], str]]) -> Entry:
    """One subject as stored. Every value is typed here (numbers as numbers, a known status): the stored files
    are written by workers, but anyone who can write to the store can write them, and the page runs a script."""
    from dbbatch.store.layout import SUCCESS

    out = join(output, sid)
    config: dict[str, Any] = {}
    if storage.exists(join(out, "config.yaml")):
        try:
            loaded = (yaml.safe_load(storage.read_text(join(out, "config.yaml"))) or {}).get("subject")
            config = loaded if isinstance(loaded, dict) else {}
        except (DbbatchError, yaml.YAMLError, AttributeError):
            config = {}
    metrics = read_json(storage, join(out, "metrics.json")) if storage.exists(join(out, SUCCESS)) else None
    if isinstance(metrics, dict):
        seconds = metrics.get("seconds") if isinstance(metrics.get("seconds"), dict) else {}
        cohort = metrics.get("cohort") if isinstance(metrics.get("cohort"), dict) else {}
        entry = Entry(sid, "succeeded", steps=_step(metrics.get("steps")), seconds=_num(seconds.get("train")),
                      final_loss=_num(metrics.get("final_loss")), run_id=_text(metrics.get("run_id")),
                      method=_text(metrics.get("method")), cohort=_text(cohort.get("id")), output=redact(out),
                      loss_curve=[x for x in map(_num, metrics.get("loss_curve") or []) if x is not None])
        ev = metrics.get("evaluation")
        if isinstance(ev, dict):
            entry.published_step, entry.best_step = _step(ev.get("published_step")), _step(ev.get("best_step"))
            entry.select_by = _select_by(ev.get("select_by"))
            entry.scores, entry.baseline = _metrics_of(ev.get("published")), _metrics_of(ev.get("baseline"))
            entry.flagged, entry.flags = bool(ev.get("flagged")), [str(f) for f in ev.get("flags") or []]
            entry.points = [{"step": _step(p.get("step")), **_metrics_of(p)} for p in ev.get("points") or []
                            if isinstance(p, dict) and _step(p.get("step")) is not None]
    elif last is not None:
        row, run_id = last
        status = row.get("status") if row.get("status") in STATUSES else "failed"
        entry = Entry(sid, status, error=_text(row.get("message")), error_class=_text(row.get("error_class")),
                      seconds=_num(row.get("seconds")), run_id=run_id, output=redact(out))
    else:
        entry = Entry(sid, "pending", output=redact(out))
    entry.class_noun, entry.token = _text(config.get("class_noun")), _text(config.get("token"))
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    entry.method = entry.method or _text(train.get("method"))
    entry.sweep_of = config["sweep_of"] if isinstance(config.get("sweep_of"), str) and config["sweep_of"] else None
    if entry.sweep_of is None and not config and is_variant_id(sid):
        # No config.yaml: a variant that failed, or is not done yet, before publishing. Its id still names
        # its base (`~` is refused in manifest ids); its settings are then shown by its id only.
        entry.sweep_of = sid.split(SEPARATOR, 1)[0] or None
    entry.swept = _swept(config.get("swept"))
    return entry


def sweep_groups(entries: list[Entry]) -> list[dict[str, Any]]:
    """Each swept subject's variants side by side, by base id (summary.json's `sweeps`): `keys`, the swept
    settings in first-seen order; `select_by`, the first succeeded variant's (one manifest setting, unless the
    sweep varies it); each variant's settings, published scores and selection score; `best`, the succeeded
    variant with the highest selection score, the first in id order of equal ones. As in best_step, a single
    lower-is-better metric scores as its negative, so the highest score is always the winner."""
    by_base: dict[str, list[Entry]] = {}
    for e in sorted(entries, key=lambda e: e.id):
        if e.sweep_of is not None:
            by_base.setdefault(e.sweep_of, []).append(e)
    groups = []
    for base, variants in sorted(by_base.items()):
        keys = list(dict.fromkeys(k for e in variants for k in e.swept))
        select_by = next((e.select_by for e in variants if e.status == "succeeded" and e.select_by is not None), None)
        rows, best = [], None
        for e in variants:
            score = selection_score(e.scores, select_by) if e.status == "succeeded" and select_by is not None else None
            rows.append({"id": e.id, "status": e.status, "settings": {k: e.swept[k] for k in keys if k in e.swept},
                         "scores": {m: e.scores.get(m) for m in METRICS}, "score": score})
            if score is not None and (best is None or score > best[0]):
                best = (score, e.id)
        groups.append({"subject": base, "keys": keys, "select_by": select_by, "variants": rows,
                       "best": None if best is None else best[1]})
    return groups


def totals(entries: list[Entry]) -> dict[str, Any]:
    count = lambda status: sum(e.status == status for e in entries)  # noqa: E731
    return {"subjects": len(entries), "succeeded": count("succeeded"), "failed": count("failed"),
            "preempted": count("preempted"), "pending": count("pending"), "flagged": sum(e.flagged for e in entries),
            "evaluated": sum(bool(e.points) for e in entries),
            "train_seconds": round(sum(e.seconds or 0 for e in entries if e.status == "succeeded"), 1)}
