"""The batch report: `<output>/_report/index.html` and `summary.json`, built from what is stored only.

Everything comes from the output store: each subject's `metrics.json`, `config.yaml`, grid and `photos.png`,
and every worker's run records in `_runs/` (all shards, all runs), so `dbbatch report OUTPUT` after a
Kubernetes Job whose pods each wrote part of the batch sees all of it. A subject is listed once: done
(`_SUCCESS`), else as its newest run record left it (failed with its error line, preempted, pending).

The page is self-contained (no requests leave it: images are files beside it, the curves are drawn with
matplotlib, the script that sorts the cards is inline). Subjects that need a human come first: flagged ones
(a metric of the published step past its evaluation.flag_below / flag_above threshold), then failed ones;
the cards can be sorted by any metric, and `#sort=<metric>&dir=asc|desc` in the address sorts on load.

A swept subject (manifest `sweep:`) is trained as one subject per combination of settings, its variants
(`rex~lr=1e-4,rank=4`); each variant's config.yaml names its base (`sweep_of`) and its settings (`swept`). The
page shows each base's variants in one table above the cards, the winner by the batch's select_by marked, with
a plot of every metric against every swept setting; summary.json's `sweeps` says the same for machines."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from dbbatch.quality.report_collect import Entry, collect, read_json, sweep_groups, totals
from dbbatch.quality.report_page import page
from dbbatch.quality.report_plots import curves_png, sweep_png
from dbbatch.store.leases import describe
from dbbatch.store.locations import join, redact

log = logging.getLogger(__name__)
REPORT = "_report"
GRID, PHOTOS, CURVES = "grid.png", "photos.png", "curves.png"
SWEEPS = "_sweeps"  # <report>/_sweeps/<base id>.png: a subject id cannot start with '_', so no card's folder
REPORT_LEASE = "_report"  # the lease report builds take (`_leases/_report/`): no subject id starts with '_'


def previous_rows(storage: Any, folder: str) -> dict[str, dict[str, Any]]:
    """The rows of the summary.json an earlier build left, by subject id ({} when there is none)."""
    url = join(folder, "summary.json")
    previous = read_json(storage, url) if storage.exists(url) else None
    rows = previous.get("subjects") if isinstance(previous, dict) else None
    return {r["id"]: r for r in rows or [] if isinstance(r, dict) and isinstance(r.get("id"), str)}


def reusable(storage: Any, folder: str, entry: Entry, row: Optional[dict[str, Any]]) -> bool:
    """Whether an earlier build's images of this subject are still its own: the same published run and step,
    and every image still there. A batch of hundreds of subjects is then not copied and re-plotted at the end
    of every shard."""
    if entry.status != "succeeded" or not row or not isinstance(row.get("images"), dict) or not row["images"]:
        return False
    same = (row.get("status"), row.get("run_id"), row.get("published_step"), row.get("steps")) == \
        ("succeeded", entry.run_id, entry.published_step, entry.steps)
    return same and all(isinstance(v, str) and storage.exists(join(folder, v)) for v in row["images"].values())


def build(storage: Any, output: str, subject_ids: Optional[list[str]] = None,
          stop: Optional[Callable[[], bool]] = None, guard: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
    """Write `<output>/_report/` (index.html, summary.json, each subject's images) from what is stored.
    Returns summary.json's content, or None when `stop()` turned true on the way (SIGTERM: the pod's grace
    period is not the report's; the page and summary.json written before stay as they were). `guard(what)`
    runs before summary.json and index.html are written (the report lease's verify: build_serialized)."""
    entries = collect(storage, output, subject_ids)
    folder = join(output, REPORT)
    shown = redact(output)  # the location as the page and summary.json show it
    before = previous_rows(storage, folder)
    for e in entries:
        out = join(output, e.id)
        if stop is not None and stop():
            log.warning("report: stopped before %s (a stop was requested); `dbbatch report %s` rebuilds it", e.id, shown)
            return None
        if reusable(storage, folder, e, before.get(e.id)):
            e.images = dict(before[e.id]["images"])
            continue
        for key, src in (("grid", join(out, "samples", GRID)), ("photos", join(out, PHOTOS))):
            if e.status == "succeeded" and storage.exists(src):
                storage.write_bytes(join(folder, e.id, f"{key}.png"), storage.read_bytes(src))
                e.images[key] = f"{e.id}/{key}.png"
        if e.status == "succeeded" and (e.loss_curve or e.points):
            storage.write_bytes(join(folder, e.id, CURVES), curves_png(e))
            e.images["curves"] = f"{e.id}/{CURVES}"
    from dbbatch.config.ids import SUBJECT_ID_RE

    sweeps = sweep_groups(entries)
    for g in sweeps:  # drawn again each time: a few per batch, and a variant finishing changes its group's plot
        if stop is not None and stop():
            log.warning("report: stopped before the plot of sweep %s (a stop was requested); `dbbatch report %s` "
                        "rebuilds it", g["subject"], shown)
            return None
        g["plot"] = None
        if not SUBJECT_ID_RE.match(g["subject"]):  # it names a file; a stored sweep_of is anyone's text
            log.warning("report: no plot for sweep %r: not a subject id", g["subject"])
        elif (png := sweep_png(g)) is not None:
            storage.write_bytes(join(folder, SWEEPS, f"{g['subject']}.png"), png)
            g["plot"] = f"{SWEEPS}/{g['subject']}.png"
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary = {"output": shown, "generated_at": generated_at, "totals": totals(entries), "sweeps": sweeps,
               "subjects": [{k: v for k, v in asdict(e).items() if k not in ("loss_curve",)} for e in
                            sorted(entries, key=lambda e: (e.attention, e.id))]}
    for name, text in (("summary.json", json.dumps(summary, indent=2) + "\n"), ("index.html", page(entries, shown, generated_at, sweeps))):
        if guard is not None:
            guard(f"writing the report's {name}")
        storage.write_text(join(folder, name), text)
    return summary


def build_serialized(storage: Any, output: str, subject_ids: Optional[list[str]], leases: Any,
                     stop: Optional[Callable[[], bool]] = None, poll_seconds: float = 1.0) -> Optional[dict[str, Any]]:
    """`build` while holding the report's lease (`leases`: a store.leases.Leases; None: build at once). Shards
    that finish together then build one at a time, each a whole report from what was stored when it began, and
    the last to write began last: index.html and summary.json always come from one build, whoever wrote last.
    Waits for a build in progress (a dead or stuck builder's lease expires); None if `stop()` turned true."""
    if leases is None:
        return build(storage, output, subject_ids, stop)
    waited = False
    while (claim := leases.claim(REPORT_LEASE)).lease is None:
        if stop is not None and stop():
            return None
        if not waited:
            log.info("report: %s is writing it; waiting to write it again after", describe(claim.current or {}))
            waited = True
        time.sleep(poll_seconds)
    lease = claim.lease
    try:
        return build(storage, output, subject_ids, stop, guard=lease.verify)
    finally:
        lease.release("done")


def refresh(storage: Any, output: str, subject_ids: Optional[list[str]], leases: Any,
            stop: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """What `dbbatch run` ends with: `build_serialized`, never raising (the report is derived from stored
    results; it never fails the run). Its page's location, or None when it was not written (logged)."""
    try:
        if build_serialized(storage, output, subject_ids, leases, stop=stop) is None:
            return None
    except Exception as e:  # noqa: BLE001
        log.error("could not write the batch report (`dbbatch report %s` rebuilds it): %s: %s", redact(output), type(e).__name__, e)
        return None
    return join(output, REPORT, "index.html")
