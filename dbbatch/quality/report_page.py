"""The batch report's page: one self-contained HTML file (inline style and script, images beside it), pure.

Subjects that need a human come first: flagged ones, then failed ones; the cards can be sorted by any metric,
and `#sort=<metric>&dir=asc|desc` in the address sorts on load.
"""

from __future__ import annotations

import html
from typing import Any, Optional
from urllib.parse import quote

from dbbatch.config.metric_names import LOWER_IS_BETTER, METRICS
from dbbatch.config.sweeps import format_value
from dbbatch.quality.evaluation import describe
from dbbatch.quality.report_collect import Entry, sweep_groups, totals
from dbbatch.quality.report_plots import sweep_metrics


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
