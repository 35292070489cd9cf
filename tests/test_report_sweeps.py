"""The batch report's sweeps: report.sweep_groups (pure), summary.json's `sweeps`, the page's Sweeps section
and its plot. The output stores are written here file by file as the worker writes them (config.yaml with
`subject.sweep_of` / `subject.swept`, metrics.json, `_SUCCESS`, a run record for a failed variant): no training.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

import numpy as np
import pytest
import yaml
from PIL import Image

from dbbatch.quality.report import build
from dbbatch.quality.report_collect import Entry, sweep_groups
from dbbatch.quality.report_plots import sweep_png
from dbbatch.store.storage import Storage

METRICS = ("dino", "clip_i", "clip_t", "class_drift", "pres")
LR, RANK = "train.learning_rate", "train.lora.rank"
# The 2x2 sweep rex + {train.learning_rate: [1e-4, 5e-5], train.lora.rank: [4, 16]}: id -> (settings, scores).
# By DINO rex~lr=1e-4,rank=16 wins; by class drift (lower is better) rex~lr=5e-5,rank=4 does.
VARIANTS = {
    "rex~lr=1e-4,rank=4": ({LR: 1e-4, RANK: 4}, {"dino": 0.61, "clip_i": 0.70, "clip_t": 0.28, "class_drift": 0.12, "pres": 0.30}),
    "rex~lr=1e-4,rank=16": ({LR: 1e-4, RANK: 16}, {"dino": 0.74, "clip_i": 0.78, "clip_t": 0.27, "class_drift": 0.20, "pres": 0.41}),
    "rex~lr=5e-5,rank=4": ({LR: 5e-5, RANK: 4}, {"dino": 0.52, "clip_i": 0.66, "clip_t": 0.30, "class_drift": 0.05, "pres": None}),
    "rex~lr=5e-5,rank=16": ({LR: 5e-5, RANK: 16}, {"dino": 0.66, "clip_i": 0.73, "clip_t": 0.29, "class_drift": 0.09, "pres": 0.33}),
}
FAILED = "rex~lr=1e-3,rank=4"  # diverged: no config.yaml, no _SUCCESS, only its run record
RED = np.array([0xD6, 0x27, 0x28])  # the best variant's star in the plot


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _subject(out: Path, sid: str, scores: dict[str, Optional[float]], sweep_of: Any = None, swept: Any = None,
             select_by: Any = "dino") -> None:
    """One published subject as the worker stores it: samples, config.yaml, metrics.json, then _SUCCESS."""
    folder = out / sid
    _png(folder / "samples" / "grid.png", (200, 40, 40))
    _png(folder / "photos.png", (40, 40, 200))
    subject = {"id": sid, "token": "sks", "class_noun": "dog", "sweep_of": sweep_of, "swept": swept or {},
               "train": {"method": "lora", "max_steps": 12, "learning_rate": 1e-4, "lora": {"rank": 4}}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"subject": subject, "resolution": 32, "base_model": "builtin:toy-sd"},
                                                       sort_keys=False))
    points = [{"step": 6, **{m: None if v is None else round(v - 0.02, 6) for m, v in scores.items()}},
              {"step": 12, **scores}]
    (folder / "metrics.json").write_text(json.dumps({
        "steps": 12, "run_id": "20250101T000000Z-r1", "method": "lora", "final_loss": 0.1, "loss_curve": [0.3, 0.2, 0.1],
        "seconds": {"train": 3.0}, "evaluation": {
            "select_by": select_by, "keep": "best", "published_step": 12, "best_step": 12, "published": {"step": 12, **scores},
            "baseline": {"step": 0, **{m: 0.1 for m in METRICS}}, "points": points, "flagged": False, "flags": []}}))
    (folder / "_SUCCESS").write_text("20250101T000000Z-r1\n")


def _store(out: Path, select_by: Any = "dino", scores: Optional[dict[str, dict]] = None) -> Path:
    """rex's four variants, an ordinary subject (tom), and a variant that failed before publishing."""
    for sid, (settings, default) in VARIANTS.items():
        _subject(out, sid, (scores or {}).get(sid, default), sweep_of="rex", swept=settings, select_by=select_by)
    _subject(out, "tom", {m: 0.99 for m in METRICS}, select_by=select_by)  # would win anything, but is no variant
    (out / "_runs").mkdir(parents=True, exist_ok=True)
    (out / "_runs" / "20250101T000000Z-r1.json").write_text(json.dumps({"run_id": "20250101T000000Z-r1", "subjects": [
        {"id": FAILED, "status": "failed", "output": str(out / FAILED), "seconds": 2.0, "error_class": "TrainingError",
         "message": "the loss is NaN at step 3; lower train.learning_rate"},
        *({"id": sid, "status": "succeeded", "output": str(out / sid)} for sid in [*VARIANTS, "tom"])]}))
    return out


def _sweeps(out: Path) -> dict[str, dict]:
    return {g["subject"]: g for g in json.loads((out / "_report" / "summary.json").read_text())["sweeps"]}


class _Tags(HTMLParser):
    """Every start tag of a page with its attributes (entities decoded, as a browser reads them)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def having(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and cls in a.get("class", "").split()]


# -- the groups (pure) ----------------------------------------------------------------------------------------
def _entry(sid: str, dino: Optional[float], drift: Optional[float] = 0.1, status: str = "succeeded", **kw: Any) -> Entry:
    return Entry(sid, status, scores={"dino": dino, "class_drift": drift} if status == "succeeded" else {},
                 select_by="dino" if status == "succeeded" else None, sweep_of="rex", **kw)


def test_sweep_groups_rank_variants_as_best_step_ranks_points():
    group, = sweep_groups([
        _entry("rex~lr=2", 0.7, swept={LR: 2e-4, "train.seed": 1}), _entry("rex~lr=1", 0.7, swept={LR: 1e-4}),
        _entry("rex~lr=3", None, swept={LR: 3e-4}), _entry("rex~lr=9", None, status="failed"),
        Entry("tom", "succeeded", scores={"dino": 0.99}, select_by="dino")])
    assert group["subject"] == "rex" and group["select_by"] == "dino"
    assert [r["id"] for r in group["variants"]] == ["rex~lr=1", "rex~lr=2", "rex~lr=3", "rex~lr=9"]  # id order, tom not in it
    assert group["keys"] == [LR, "train.seed"]  # first seen, in id order
    assert group["best"] == "rex~lr=1"  # equal scores: the first in id order
    assert [r["score"] for r in group["variants"]] == [0.7, 0.7, None, None]
    assert group["variants"][1]["settings"] == {LR: 2e-4, "train.seed": 1} and group["variants"][3]["settings"] == {}
    # negative control: one more DINO point and the other variant wins
    group, = sweep_groups([_entry("rex~lr=2", 0.71), _entry("rex~lr=1", 0.7)])
    assert group["best"] == "rex~lr=2"
    # lower is better: the variant with the least class drift, scored as its negative like best_step does
    e = [_entry("rex~a", 0.9, 0.3), _entry("rex~b", 0.1, 0.05), _entry("rex~c", 0.5, 0.2)]
    for x in e:
        x.select_by = "class_drift"
    group, = sweep_groups(e)
    assert group["best"] == "rex~b" and group["variants"][1]["score"] == pytest.approx(-0.05)
    for x in e:  # a weighted select_by: 0.9-0.6=0.3, 0.1-0.1=0, 0.5-0.4=0.1
        x.select_by = {"dino": 1.0, "class_drift": -2.0}
    assert sweep_groups(e)[0]["best"] == "rex~a"
    # nothing scored yet: no winner (and no plot to draw)
    group, = sweep_groups([_entry("rex~x", None, None, swept={LR: 1e-4}), _entry("rex~y", None, status="pending")])
    assert group["best"] is None and group["select_by"] == "dino" and sweep_png(group) is None
    assert sweep_groups([Entry("tom", "succeeded", scores={"dino": 0.5}, select_by="dino")]) == []


# -- summary.json -----------------------------------------------------------------------------------------------
def test_summary_json_names_the_winning_variant_and_follows_the_scores(tmp_path: Path):
    out = _store(tmp_path / "out")
    summary = build(Storage({}), str(out))
    assert json.loads((out / "_report" / "summary.json").read_text())["sweeps"] == summary["sweeps"]
    rex = _sweeps(out)["rex"]
    assert list(_sweeps(out)) == ["rex"]  # tom is no sweep
    assert rex["best"] == "rex~lr=1e-4,rank=16" and rex["select_by"] == "dino"
    assert rex["keys"] == [LR, RANK]
    assert [r["id"] for r in rex["variants"]] == sorted([*VARIANTS, FAILED])
    rows = {r["id"]: r for r in rex["variants"]}
    assert rows[FAILED] == {"id": FAILED, "status": "failed", "settings": {}, "scores": {m: None for m in METRICS}, "score": None}
    for sid, (settings, scores) in VARIANTS.items():
        assert rows[sid] == {"id": sid, "status": "succeeded", "settings": settings, "scores": scores, "score": scores["dino"]}
    subjects = {s["id"]: s for s in summary["subjects"]}
    assert subjects["rex~lr=5e-5,rank=4"]["sweep_of"] == "rex" and subjects["rex~lr=5e-5,rank=4"]["swept"] == {LR: 5e-5, RANK: 4}
    assert subjects["tom"]["sweep_of"] is None and subjects["tom"]["swept"] == {}
    assert rex["plot"] == "_sweeps/rex.png"

    # negative control: the stored scores change so another variant has the best DINO; the report follows
    better = dict(VARIANTS["rex~lr=5e-5,rank=4"][1], dino=0.9)
    _subject(out, "rex~lr=5e-5,rank=4", better, sweep_of="rex", swept=VARIANTS["rex~lr=5e-5,rank=4"][0])
    build(Storage({}), str(out))
    assert _sweeps(out)["rex"]["best"] == "rex~lr=5e-5,rank=4"

    # a lower-is-better select_by: the variant with the least class drift wins, not the most
    out2 = _store(tmp_path / "drift", select_by="class_drift")
    build(Storage({}), str(out2))
    rex = _sweeps(out2)["rex"]
    assert rex["best"] == "rex~lr=5e-5,rank=4" and rex["select_by"] == "class_drift"
    assert {r["id"]: r["score"] for r in rex["variants"]}["rex~lr=1e-4,rank=16"] == pytest.approx(-0.20)


# -- the page -------------------------------------------------------------------------------------------------
def test_the_page_shows_one_row_per_variant_with_the_best_marked_and_linked_cards(tmp_path: Path):
    out = _store(tmp_path / "out")
    build(Storage({}), str(out))
    text = (out / "_report" / "index.html").read_text()
    page = _Tags(text)
    sweeps = page.having("section", "sweep")
    assert [s["data-subject"] for s in sweeps] == ["rex"]
    assert text.index('<h2>Sweeps</h2>') < text.index('<div id="cards">')  # above the cards
    rows = page.having("tr", "variant")
    assert [r["data-id"] for r in rows] == sorted([*VARIANTS, FAILED])  # one row per variant, the failed one too
    assert [r["data-id"] for r in page.having("tr", "best")] == ["rex~lr=1e-4,rank=16"]
    best_row = text[text.index('data-id="rex~lr=1e-4,rank=16">'):]
    assert "★ best" in best_row[: best_row.index("</tr>")]
    assert text.count("★ best") == 1
    assert "max dino" in text  # what the score column is
    # each variant links to its card: the href's fragment, percent-decoded as a browser does, is a card's id
    card_ids = {a["id"] for a in page.having("section", "card")}
    links = [a["href"] for t, a in page.tags if t == "a" and a.get("href", "").startswith("#card-")]
    assert len(links) == 5 and all("=" not in h and "," not in h for h in links)  # quoted
    assert {unquote(h[1:]) for h in links} == {f"card-{sid}" for sid in [*VARIANTS, FAILED]} <= card_ids
    assert "card-tom" in card_ids
    # the swept settings as the variant ids write them, and only metrics that have values
    assert "<td>1e-4</td>" in text and "<td>5e-5</td>" in text and "<td>16</td>" in text


def test_the_sweep_plot_is_a_png_with_the_best_variant_highlighted(tmp_path: Path):
    out = _store(tmp_path / "out")
    build(Storage({}), str(out))
    png = out / "_report" / "_sweeps" / "rex.png"
    img = Image.open(png)
    img.load()
    assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 600  # 2 settings x 5 metrics
    src = [a["src"] for a in _Tags((out / "_report" / "index.html").read_text()).having("img", "sweep")]
    assert src == ["_sweeps/rex.png"]

    def red(pixels: np.ndarray) -> int:
        return int((np.abs(pixels[..., :3].astype(int) - RED).max(axis=2) < 30).sum())

    assert red(np.asarray(img.convert("RGB"))) > 50
    # negative control: the same variants with no scores to rank (no select_by): no star anywhere
    group = _sweeps(out)["rex"]
    group["best"] = None
    plain = np.asarray(Image.open(io.BytesIO(sweep_png(group))).convert("RGB"))
    assert red(plain) == 0


def test_images_of_variant_ids_are_quoted_paths_that_exist(tmp_path: Path):
    out = _store(tmp_path / "out")
    build(Storage({}), str(out))
    report = out / "_report"
    srcs = [a["src"] for t, a in _Tags((report / "index.html").read_text()).tags if t == "img"]
    variant_srcs = [s for s in srcs if s.startswith("rex")]
    assert len(variant_srcs) == 4 * 3  # grid, photos, curves of each published variant
    for s in srcs:
        assert "=" not in s and "," not in s, s  # '~' is unreserved; '=' and ',' are percent-encoded
        assert (report / unquote(s)).is_file(), s
    assert "rex~lr%3D1e-4%2Crank%3D16/grid.png" in srcs
    assert (report / "rex~lr=1e-4,rank=16" / "grid.png").is_file()
    # a second build reuses the copied images of unchanged variants under the same paths
    drawn = (report / "rex~lr=1e-4,rank=16" / "curves.png").stat().st_mtime_ns
    build(Storage({}), str(out))
    assert (report / "rex~lr=1e-4,rank=16" / "curves.png").stat().st_mtime_ns == drawn


def test_a_hostile_config_does_not_break_the_report(tmp_path: Path):
    """Anyone who can write to the store writes config.yaml: swept as a list, sweep_of as a number, values that
    are mappings, NaN, mathtext and markup are typed away or shown as text; a sweep_of that is a path gets no
    plot file (it would name one outside the report)."""
    out = tmp_path / "out"
    evil = '"><script>alert(1)</script>'
    scores = {"dino": 0.5, "clip_i": 0.5, "clip_t": 0.2, "class_drift": 0.1, "pres": 0.3}
    _subject(out, "rex~a", scores, sweep_of="rex", swept=[LR, 1e-4])
    _subject(out, "rex~b", scores, sweep_of=42, swept={LR: {"nested": 1}, RANK: [4, 8], "train.seed": float("nan"), 7: "x"})
    _subject(out, "rex~c", {**scores, "dino": 0.6}, sweep_of="rex",
             swept={LR: 1e-4, "train.instance_prompt": "$\\frac{$ a photo of " + evil, evil: evil, "train.flag": True})
    _subject(out, "rex~d", scores, sweep_of="rex", swept={LR: 2e-4}, select_by=["dino"])
    _subject(out, "esc~a", scores, sweep_of="../../escaped", swept={LR: 1e-4})
    _subject(out, "odd~a", scores, sweep_of=evil, swept={LR: 1e-4}, select_by={"dino": "lots"})
    summary = build(Storage({}), str(out))
    json.loads((out / "_report" / "summary.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"summary.json has {c}"))  # strict JSON
    rows = {s["id"]: s for s in summary["subjects"]}
    assert rows["rex~a"]["swept"] == {} and rows["rex~a"]["sweep_of"] == "rex"
    assert rows["rex~b"]["sweep_of"] is None and rows["rex~b"]["swept"] == {}
    assert rows["rex~c"]["swept"] == {LR: 1e-4, "train.instance_prompt": "$\\frac{$ a photo of " + evil, evil: evil,
                                      "train.flag": True}
    assert rows["rex~d"]["select_by"] is None and rows["odd~a"]["select_by"] is None
    groups = {g["subject"]: g for g in summary["sweeps"]}
    assert sorted(groups) == sorted(["rex", "../../escaped", evil])
    assert [r["id"] for r in groups["rex"]["variants"]] == ["rex~a", "rex~c", "rex~d"]
    assert groups["rex"]["best"] == "rex~c" and groups["rex"]["plot"] == "_sweeps/rex.png"
    Image.open(out / "_report" / "_sweeps" / "rex.png").load()  # the $...$ label was drawn as text
    assert groups["../../escaped"]["plot"] is None and groups[evil]["plot"] is None
    assert not (tmp_path / "escaped.png").exists() and not (out / "escaped.png").exists()
    assert sorted(p.name for p in (out / "_report" / "_sweeps").iterdir()) == ["rex.png"]
    page = (out / "_report" / "index.html").read_text()
    assert "<script>alert" not in page and page.count("<script>") == 1  # the page's own sorting script only


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian's package: apt-get install chromium; CI installs it)")
def test_a_browser_shows_the_images_of_variant_ids(tmp_path: Path):
    """The quoted paths load in a real browser: the page with its images beside it against the same page alone
    (text and table only), on a store of variants only, so every card image has `~`, `=` and `,` in its path."""
    out = tmp_path / "out"
    for sid, (settings, scores) in VARIANTS.items():
        _subject(out, sid, scores, sweep_of="rex", swept=settings)
    build(Storage({}), str(out))
    (tmp_path / "alone").mkdir()
    shutil.copy(out / "_report" / "index.html", tmp_path / "alone" / "index.html")

    def coloured(page: Path) -> float:
        shot = tmp_path / f"{page.parent.name}.png"
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--window-size=1200,4000", f"--screenshot={shot}", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert shot.exists(), proc.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).mean())

    with_images, alone = coloured(out / "_report" / "index.html"), coloured(tmp_path / "alone" / "index.html")
    # measured 0.055 / 0.0008; card images whose paths do not resolve (quoted twice): 0.0025, the plot alone
    assert with_images > 3 * alone + 0.01, (with_images, alone)


def test_run_records_name_only_subjects_that_can_be_folders(tmp_path: Path):
    """A run record is anyone's to write: a failed 'subject' named like a path is not shown (nor written), a
    failed variant is, in its sweep's table."""
    out = _store(tmp_path / "out")
    (out / "_runs").mkdir(exist_ok=True)
    (out / "_runs" / "20991231T000000Z-evil.json").write_text(json.dumps({"run_id": "20991231T000000Z-evil", "subjects": [
        {"id": "../../escaped", "status": "failed", "message": "x"},
        {"id": "rex~lr=1e-2,rank=4", "status": "failed", "message": "diverged"}]}))
    summary = build(Storage({}), str(out))
    ids = {s["id"] for s in summary["subjects"]}
    assert "rex~lr=1e-2,rank=4" in ids and "../../escaped" not in ids
    assert not (tmp_path / "escaped").exists() and not (out / "escaped").exists()
    (group,) = [g for g in summary["sweeps"] if g["subject"] == "rex"]
    assert "rex~lr=1e-2,rank=4" in [v["id"] for v in group["variants"]]
