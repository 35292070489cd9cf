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
a plot of every metric against every swept setting; summary.json's `sweeps` says the same for machines.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import quote

import yaml

from dbbatch.errors import DbbatchError
from dbbatch.evaluation import LOWER_IS_BETTER, METRICS, describe, selection_score
from dbbatch.storage import join, redact
from dbbatch.report_plots import curves_png, sweep_metrics, sweep_png
from dbbatch.sweeps import SEPARATOR, format_value, is_variant_id, valid_variant_id

log = logging.getLogger(__name__)

REPORT = "_report"
GRID, PHOTOS, CURVES = "grid.png", "photos.png", "curves.png"
SWEEPS = "_sweeps"  # <report>/_sweeps/<base id>.png: a subject id cannot start with '_', so no card's folder


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


def _read_json(storage: Any, url: str) -> Optional[Any]:
    try:
        return storage.read_json(url)
    except DbbatchError as e:
        log.warning("report: cannot read %s: %s", url, e)
        return None


def run_records(storage: Any, output: str) -> list[dict[str, Any]]:
    """Every stored run record, oldest first (run ids begin with their UTC start time)."""
    records = []
    for url in storage.list_files(join(output, "_runs"), fresh=True):  # other shards' records, not a cached listing
        if url.endswith(".json") and isinstance(record := _read_json(storage, url), dict):
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
    from dbbatch.manifest import SUBJECT_ID_RE

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
    from dbbatch.worker import SUCCESS

    out = join(output, sid)
    config: dict[str, Any] = {}
    if storage.exists(join(out, "config.yaml")):
        try:
            loaded = (yaml.safe_load(storage.read_text(join(out, "config.yaml"))) or {}).get("subject")
            config = loaded if isinstance(loaded, dict) else {}
        except (DbbatchError, yaml.YAMLError, AttributeError):
            config = {}
    metrics = _read_json(storage, join(out, "metrics.json")) if storage.exists(join(out, SUCCESS)) else None
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


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _card_anchor(sid: str) -> str:
    """A card's element id: prefixed, so that a subject named `sort` or `cards` cannot take the page's own."""
    return f"card-{sid}"


def _sweep_anchor(base: str) -> str:
    return f"sweep-{base}"


BEST_MARK = ' <span class="best-mark">★ best</span>'


def _sweep_block(g: dict[str, Any]) -> str:
    """One sweep_groups() group as a table, one row per variant (the best marked), and its plot."""
    metrics = sweep_metrics(g)
    head = ("<th>variant</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in g["keys"]) + "<th>status</th>"
            + "".join(f"<th>{m}{' ↓' if m in LOWER_IS_BETTER else ''}</th>" for m in metrics)
            + f"<th>score{' (' + html.escape(describe(g['select_by'])) + ')' if g['select_by'] is not None else ''}</th>")
    rows = []
    for r in g["variants"]:
        best = r["id"] == g["best"]
        settings = "".join(f"<td>{html.escape(format_value(r['settings'][k])) if k in r['settings'] else '–'}</td>"
                           for k in g["keys"])
        scores = "".join(f"<td>{_fmt(r['scores'].get(m))}</td>" for m in metrics)
        rows.append(f'<tr class="variant {r["status"]}{" best" if best else ""}" data-id="{html.escape(r["id"])}">'
                    f'<td class="id"><a href="#{html.escape(quote(_card_anchor(r["id"])))}">{html.escape(r["id"])}</a>'
                    f'{BEST_MARK if best else ""}</td>{settings}<td>{r["status"]}</td>{scores}'
                    f'<td>{_fmt(r["score"])}</td></tr>')
    plot = g.get("plot")
    img = (f'<figure><img class="sweep" src="{html.escape(quote(plot))}" alt="metrics against the swept settings of '
           f'{html.escape(g["subject"])}"><figcaption>each metric against each swept setting; red star: the best '
           f'variant</figcaption></figure>') if plot else ""
    won = f"best: {html.escape(g['best'])}" if g["best"] is not None else "no variant scored yet"
    return (f'<section class="sweep" id="{html.escape(_sweep_anchor(g["subject"]))}" data-subject="{html.escape(g["subject"])}">'
            f'<h3>{html.escape(g["subject"])} <span class="facts">{len(g["variants"])} variants · {won}</span></h3>'
            f'<table class="sweep-table"><tr>{head}</tr>{"".join(rows)}</table>{img}</section>')


def _card(e: Entry) -> str:
    data = " ".join(f'data-{m.replace("_", "-")}="{"" if e.scores.get(m) is None else e.scores[m]}"' for m in METRICS)
    badge = "flagged" if e.flagged else e.status
    rows = "".join(
        f"<tr><th>{m}{' ↓' if m in LOWER_IS_BETTER else ''}</th><td>{_fmt(e.scores.get(m))}</td><td>{_fmt(e.baseline.get(m))}</td></tr>"
        for m in METRICS if e.scores.get(m) is not None or e.baseline.get(m) is not None)
    table = f'<table class="scores"><tr><th></th><th>published</th><th>base</th></tr>{rows}</table>' if rows else ""
    # The image paths are folder names: quoted, since a sweep variant's id has '~', '=' and ','
    imgs = "".join(f'<figure><img class="{k}" src="{html.escape(quote(e.images[k]))}" alt="{k} of {html.escape(e.id)}"><figcaption>{k}</figcaption></figure>'
                   for k in ("grid", "photos", "curves") if k in e.images)
    facts = [html.escape(e.method) if e.method else None, f"class {html.escape(e.class_noun)}" if e.class_noun else None,
             f"{e.steps} steps" if e.steps is not None else None,
             f"published step {e.published_step} (best {e.best_step})" if e.published_step is not None else None,
             f"cohort {html.escape(e.cohort)}" if e.cohort else None, f"{e.seconds:.0f} s training" if e.seconds else None,
             f'variant of <a href="#{html.escape(quote(_sweep_anchor(e.sweep_of)))}">{html.escape(e.sweep_of)}</a>'
             + html.escape("".join(f", {k}={format_value(v)}" for k, v in e.swept.items())) if e.sweep_of else None]
    flags = "".join(f"<li>{html.escape(f)}</li>" for f in e.flags)
    error = f'<p class="error">{html.escape(e.error_class or "")}: {html.escape(e.error)}</p>' if e.error else ""
    return (f'<section class="card {badge}" data-id="{html.escape(e.id)}" data-status="{e.status}" '
            f'data-flagged="{str(e.flagged).lower()}" data-attention="{e.attention}" {data} id="{html.escape(_card_anchor(e.id))}">'
            f'<h2>{html.escape(e.id)} <span class="badge">{badge}</span></h2>'
            f'<p class="facts">{" · ".join(f for f in facts if f)}</p>'
            f'{"<ul class=flags>" + flags + "</ul>" if flags else ""}{error}{table}<div class="images">{imgs}</div></section>')


STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.totals td,.totals th{padding:2px 10px;text-align:left} .card{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:10px 14px;margin:12px 0} .card.flagged{border-left:6px solid #d62728} .card.failed,.card.preempted,.card.pending
{border-left:6px solid #ff7f0e} .badge{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee}
.flagged .badge{background:#d62728;color:#fff} .failed .badge{background:#ff7f0e;color:#fff} .error{color:#b00}
.flags{color:#d62728;margin:4px 0} .scores td,.scores th{padding:1px 8px;text-align:right} .images{display:flex;
flex-wrap:wrap;gap:10px} figure{margin:0} figure img{max-height:260px;image-rendering:pixelated;border:1px solid #eee}
figcaption{font-size:11px;color:#777} .facts{color:#555;margin:2px 0} img.grid{height:192px} img.photos{height:64px}
.sweep{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:12px 0} .sweep-table{border-collapse:
collapse;margin-bottom:8px} .sweep-table td,.sweep-table th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}
.sweep-table td.id{text-align:left} .sweep-table tr.best{background:#e3f4e1;font-weight:600} .best-mark{color:#2ca02c}
.sweep-table tr.failed,.sweep-table tr.preempted,.sweep-table tr.pending{color:#b45a00}
img.sweep{max-height:none;max-width:100%;image-rendering:auto}
"""

SCRIPT = """
function sortCards(metric, dir) {
  const box = document.getElementById('cards');
  const cards = Array.from(box.children);
  const key = c => { const v = c.dataset[metric.replace(/_(.)/g, (m, x) => x.toUpperCase())]; return v === '' || v === undefined ? null : parseFloat(v); };
  cards.sort((a, b) => {
    const ga = +a.dataset.attention, gb = +b.dataset.attention;
    if (ga !== gb) return ga - gb;               // flagged first, then not done, then the rest
    if (metric === 'id') return a.dataset.id < b.dataset.id ? -1 : 1;
    const va = key(a), vb = key(b);
    if (va === null && vb === null) return a.dataset.id < b.dataset.id ? -1 : 1;
    if (va === null) return 1; if (vb === null) return -1;
    return dir === 'asc' ? va - vb : vb - va;
  });
  cards.forEach(c => box.appendChild(c));
  document.body.dataset.sortedBy = metric + ':' + dir;
  document.getElementById('sort').value = metric; document.getElementById('dir').value = dir;
}
function fromHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  sortCards(h.get('sort') || 'id', h.get('dir') || 'desc');
}
window.addEventListener('hashchange', fromHash);
document.addEventListener('DOMContentLoaded', () => {
  const go = () => sortCards(document.getElementById('sort').value, document.getElementById('dir').value);
  document.getElementById('sort').addEventListener('change', go);
  document.getElementById('dir').addEventListener('change', go);
  fromHash();
});
"""


def totals(entries: list[Entry]) -> dict[str, Any]:
    count = lambda status: sum(e.status == status for e in entries)  # noqa: E731
    return {"subjects": len(entries), "succeeded": count("succeeded"), "failed": count("failed"),
            "preempted": count("preempted"), "pending": count("pending"), "flagged": sum(e.flagged for e in entries),
            "evaluated": sum(bool(e.points) for e in entries),
            "train_seconds": round(sum(e.seconds or 0 for e in entries if e.status == "succeeded"), 1)}


def page(entries: list[Entry], output: str, generated_at: str, sweeps: Optional[list[dict[str, Any]]] = None) -> str:
    """The page; `sweeps`: sweep_groups(entries) with each group's plot path (build's), else without plots."""
    t = totals(entries)
    sweeps = sweep_groups(entries) if sweeps is None else sweeps
    swept = f'<h2>Sweeps</h2><div id="sweeps">{"".join(_sweep_block(g) for g in sweeps)}</div>' if sweeps else ""
    ordered = sorted(entries, key=lambda e: (e.attention, e.id))
    cells = "".join(f"<th>{k.replace('_', ' ')}</th><td>{v}</td>" for k, v in t.items())
    options = "".join(f'<option value="{m}">{m}</option>' for m in ("id", *METRICS))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dbbatch report: {html.escape(output)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{STYLE}</style></head>
<body data-sorted-by="">
<h1>dbbatch report</h1>
<p>{html.escape(output)} · generated {html.escape(generated_at)} · machine-readable: <a href="summary.json">summary.json</a></p>
<table class="totals" id="totals"><tr>{cells}</tr></table>
{swept}
<p>Sort by <select id="sort">{options}</select> <select id="dir"><option value="desc">highest first</option>
<option value="asc">lowest first</option></select> (flagged subjects, then unfinished ones, stay on top)</p>
<div id="cards">{"".join(_card(e) for e in ordered)}</div>
<script>{SCRIPT}</script>
</body></html>
"""


def previous_rows(storage: Any, folder: str) -> dict[str, dict[str, Any]]:
    """The rows of the summary.json an earlier build left, by subject id ({} when there is none)."""
    url = join(folder, "summary.json")
    previous = _read_json(storage, url) if storage.exists(url) else None
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
          stop: Optional[Callable[[], bool]] = None) -> Optional[dict[str, Any]]:
    """Write `<output>/_report/` (index.html, summary.json, each subject's images) from what is stored.
    Returns summary.json's content, or None when `stop()` turned true on the way (SIGTERM: the pod's grace
    period is not the report's; the page and summary.json written before stay as they were)."""
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
    from dbbatch.manifest import SUBJECT_ID_RE

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
    storage.write_text(join(folder, "summary.json"), json.dumps(summary, indent=2) + "\n")
    storage.write_text(join(folder, "index.html"), page(entries, shown, generated_at, sweeps))
    return summary
