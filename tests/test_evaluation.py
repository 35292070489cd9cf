"""Evaluation (issue 14): the metrics (pure), the best step, its resumable state, packed subjects, the report.

The learning side (a trained subject scores above the base model, prior preservation lowers class drift, an
under-trained subject is flagged, over-fitting later steps lose to an earlier one) is measured on
builtin:toy-sd in test_learning.py; here the built-in tiny model (random weights) keeps the runs fast and
builtin:toy-clip stands in for both CLIP and DINO. Rendering is seeded per image and these processes use one
thread, so the same weights score the same numbers: equalities below are exact unless a tolerance is named.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, draw_subject, run_cli, start_at_fault, tiny_manifest
from safetensors.torch import load_file

from dbbatch.quality import evaluation as ev

METRICS = ("dino", "clip_i", "clip_t", "class_drift", "pres")
EVALUATION = {"clip": "builtin:toy-clip", "dino": "builtin:toy-clip", "seeds": [0, 1]}


# -- the metrics (pure) ---------------------------------------------------------------------------------------
def test_metrics_on_known_embeddings():
    x, y = [1.0, 0.0], [0.0, 1.0]
    photos = np.array([x, x])
    assert ev.mean_pairwise_cosine(np.array([x, y]), photos) == pytest.approx(0.5)  # one match, one orthogonal
    assert ev.mean_paired_cosine(np.array([x, y]), np.array([x, [0.0, -3.0]])) == pytest.approx(0.0)  # +1 and -1
    got = ev.score(gen_dino=np.array([x, x]), photo_dino=photos, class_dino=np.array([y, y]),
                   gen_clip=np.array([x, y]), photo_clip=photos, text_clip=np.array([x, x]),
                   class_clip=np.array([x, y]), base_class_clip=np.array([x, x]))
    assert got == {"dino": 1.0, "pres": 0.0, "clip_i": 0.5, "clip_t": 0.5, "class_drift": 0.5}
    # a metric whose model is not loaded is None, not 0
    assert ev.score(gen_clip=np.array([x]), photo_clip=photos) == {"dino": None, "clip_i": 1.0, "clip_t": None,
                                                                    "class_drift": None, "pres": None}
    with pytest.raises(ValueError, match="same shape"):
        ev.mean_paired_cosine(np.array([x]), np.array([x, y]))
    assert ev.class_version("a photo of a {token} {class_noun} on red", "dog") == "a photo of a dog on red"


def test_best_step_maximises_minimises_weights_and_skips_unscored_points():
    points = [{"step": 10, "dino": 0.45, "class_drift": 0.1}, {"step": 20, "dino": 0.7, "class_drift": 0.4},
              {"step": 30, "dino": 0.7, "class_drift": 0.3}, {"step": 40, "dino": None, "class_drift": 0.0}]
    assert ev.best_step(points, "dino") == 20  # the earliest of equal scores
    assert ev.best_step(points, "class_drift") == 40  # lower is better
    assert ev.best_step(points, {"dino": 1.0, "class_drift": -1.0}) == 30  # 0.35, 0.3, 0.4
    assert ev.selection_score(points[2], {"dino": 1.0, "class_drift": -1.0}) == pytest.approx(0.4)
    assert ev.best_step(points, {"dino": 1.0, "class_drift": -2.0}) == 10  # 0.25, -0.1, 0.1
    assert ev.best_step([{"step": 5, "dino": None}], "dino") is None
    assert ev.describe({"dino": 1.0, "class_drift": -0.5}) == "max 1*dino - 0.5*class_drift"
    assert ev.describe("pres") == "min pres"


def test_flags_and_evaluation_points():
    point = {"dino": 0.41, "clip_t": 0.3, "class_drift": 0.5, "pres": None}
    assert ev.flags(point, {"dino": 0.5, "clip_t": 0.2, "pres": 0.9}, {"class_drift": 0.3}) == [
        "dino 0.410 < 0.5", "class_drift 0.500 > 0.3"]
    assert ev.flags(point, {"dino": 0.4}, {}) == [] and ev.flags(None, {"dino": 0.4}, {}) == []
    base = {"dino": 0.45, "clip_t": 0.2, "class_drift": 0.0, "pres": 0.1}
    assert ev.flags({**point, "pres": 0.1}, {}, {}, ["dino", "clip_t", "pres"], base) == [
        "dino 0.410 not above the base model's 0.450", "pres 0.100 not below the base model's 0.100"]
    assert ev.flags(point, {}, {}, ["dino"], None) == []  # no base-model point: nothing to compare with
    assert [s for s in range(0, 13) if ev.due(s, 5, 12)] == [5, 10, 12]


# -- real runs on the tiny model ------------------------------------------------------------------------------
STEPS, EVERY = 12, 4


def _manifest(tmp: Path, name: str, evaluation: dict | None = None, subjects: list[dict] | None = None,
              train: dict | None = None, **top) -> Path:
    for sid, color in (("rex", (220, 30, 30)), ("tom", (30, 30, 220)), ("kit", (30, 200, 30))):
        if not (tmp / "imgs" / sid).exists():
            draw_subject(tmp / "imgs" / sid, color=color)
    subjects = subjects or [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"}]
    return tiny_manifest(tmp / f"{name}.yaml", name, subjects, **top, defaults={
        "resolution": 32, "train": {"max_steps": STEPS, "checkpoint_every": EVERY, "learning_rate": 1e-3, **(train or {})},
        "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
        "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2},
        "evaluation": {**EVALUATION, "every": EVERY, "keep": "best", "select_by": "class_drift", **(evaluation or {})}})


def _evaluation(out: Path, sid: str = "rex") -> dict:
    return json.loads((out / sid / "metrics.json").read_text())["evaluation"]


def _scores(points: list[dict]) -> list[dict]:
    return [{k: p[k] for k in ("step", *METRICS)} for p in points]


def _unet(out: Path, sid: str = "rex") -> dict[str, torch.Tensor]:
    return load_file(str(out / sid / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval-ref")
    proc = run_cli("run", str(_manifest(tmp, "ref")), env=cli_env(DBBATCH_WORK_DIR=str(tmp / "work")), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ref"


def test_metrics_json_lists_every_point_and_the_published_step_is_the_best(uninterrupted: Path):
    e = _evaluation(uninterrupted)
    assert [p["step"] for p in e["points"]] == [4, 8, 12]
    assert e["select_by"] == "class_drift" and e["keep"] == "best"
    assert e["best_step"] == ev.best_step(e["points"], "class_drift") == e["published_step"]
    assert all(isinstance(p[m], float) for p in e["points"] for m in METRICS)
    assert e["baseline"]["step"] == 0 and e["baseline"]["class_drift"] == 0.0
    # the class moves away from the base model's as training goes on, so an earlier step wins here
    assert e["best_step"] < STEPS, e["points"]
    m = json.loads((uninterrupted / "rex" / "metrics.json").read_text())
    assert m["published_step"] == e["best_step"] and m["steps"] == STEPS


def test_resume_keeps_the_evaluation_history_and_the_winner(tmp_path: Path, uninterrupted: Path):
    """SIGKILL at step 9 (checkpoint of step 8, points 4 and 8 scored), rerun on a fresh pod: the same points,
    the ones before the kill not recomputed (they carry the killed run's id), the same winner, the same
    published weights. Negative control: a rerun whose evaluation settings changed drops the history (step 4
    is lost, step 8 is scored again under the new seeds), and the comparison sees it."""
    def killed(name: str) -> tuple[Path, str]:
        m = _manifest(tmp_path, name)  # the reference's manifest
        proc, _ = start_at_fault(m, tmp_path / f"{name}-pod1", "pause_at_step=9")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert sorted(p.name for p in (tmp_path / name / "rex" / "checkpoints").glob("*.ckpt")) == ["step-0000008.ckpt"]
        return m, json.loads(next((tmp_path / name / "_leases" / "rex").glob("*.json")).read_text())["holder"]["run_id"]

    m, first_run = killed("resumed")
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "step-0000008.ckpt" in rerun.stderr
    ref, got = _evaluation(uninterrupted), _evaluation(tmp_path / "resumed")
    assert _scores(got["points"]) == _scores(ref["points"])
    assert [p["run_id"] for p in got["points"]][:2] == [first_run, first_run]  # stored, not recomputed
    assert got["points"][2]["run_id"] != first_run
    assert (got["best_step"], got["published_step"]) == (ref["best_step"], ref["published_step"])
    a, b = _unet(uninterrupted), _unet(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # negative control: other evaluation seeds -> the stored points are dropped (one warning), and they differ
    killed("changed")
    m2 = _manifest(tmp_path, "changed", evaluation={"seeds": [5, 6]})
    rerun = run_cli("run", str(m2), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod3")), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "the evaluation settings changed since its last checkpoint: its 2 earlier evaluation point(s) are dropped" in rerun.stderr
    changed = _evaluation(tmp_path / "changed")["points"]
    assert [p["step"] for p in changed] == [8, 12]  # the resumed step is scored first, under the new settings
    assert _scores(changed) != _scores(ref["points"])  # what the equality above would have caught


def test_a_packed_subject_is_scored_from_its_own_adapter_slot(tmp_path: Path):
    """tom and kit trained together (K=2) score what each scores trained alone (to float32 rounding, as the
    adapters agree; test_packing.py; measured < 1e-5), and their points differ from each other's and from the
    base model's by over 10x the tolerance (measured 7e-3 from the base after 12 steps): a slot mix-up or
    adapters left off would be seen."""
    subjects = [{"id": sid, "token": "sks", "class_noun": "dog", "images": f"imgs/{sid}/", "train": {"seed": i}}
                for i, sid in enumerate(("tom", "kit"))]
    outs = {}
    for k in (2, 1):
        m = _manifest(tmp_path, f"k{k}", subjects=subjects, packing={"subjects_per_step": k},
                      evaluation={"select_by": "dino", "keep": "last"}, train={"method": "lora", "learning_rate": 3e-3})
        proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work")), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[k] = tmp_path / f"k{k}"
    assert json.loads((outs[2] / "tom" / "metrics.json").read_text())["cohort"]["size"] == 2
    tol = 1e-4

    def gap(a: dict, b: dict) -> float:
        return max(abs(p[m] - q[m]) for p, q in zip(a["points"], b["points"]) for m in ("dino", "clip_i", "clip_t", "pres"))

    for sid in ("tom", "kit"):
        packed, solo = _evaluation(outs[2], sid), _evaluation(outs[1], sid)
        assert [p["step"] for p in packed["points"]] == [4, 8, 12]
        assert gap(packed, solo) < tol, (packed["points"], solo["points"])
        last = {**packed["baseline"], "step": 12}
        assert gap({"points": [packed["points"][-1]]}, {"points": [last]}) > 10 * tol  # the adapter was on
    assert gap(_evaluation(outs[2], "tom"), _evaluation(outs[1], "kit")) > 10 * tol


# -- the report ------------------------------------------------------------------------------------------------
def _report_batch(tmp: Path) -> tuple[Path, Path]:
    """Four subjects over two shards (each its own process and work dir): a is flagged, bad fails (a photo
    that is not an image among good ones is skipped, so bad's only photo is junk)."""
    (tmp / "imgs" / "bad").mkdir(parents=True, exist_ok=True)
    (tmp / "imgs" / "bad" / "x.png").write_bytes(b"not a png at all")
    subjects = [{"id": sid, "token": "sks", "class_noun": "dog", "images": f"imgs/{src}/"}
                for sid, src in (("a", "rex"), ("b", "tom"), ("c", "kit"), ("bad", "bad"))]
    subjects[0]["evaluation"] = {"flag_below": {"dino": 0.999}}
    m = _manifest(tmp, "batch", subjects=subjects, evaluation={"every": 3, "select_by": "dino"}, train={"max_steps": 6})
    for shard in (0, 1):
        proc = run_cli("run", str(m), "--shard-index", str(shard), "--shard-count", "2",
                       env=cli_env(DBBATCH_WORK_DIR=str(tmp / f"pod{shard}")), cwd=tmp)
        assert proc.returncode in (0, 1, 2), proc.stderr[-3000:]
        assert f"report: {tmp / 'batch' / '_report' / 'index.html'}" in proc.stdout
    return m, tmp / "batch"


@pytest.fixture(scope="module")
def report_batch(tmp_path_factory) -> tuple[Path, Path]:
    return _report_batch(tmp_path_factory.mktemp("report"))


def test_the_report_from_two_shards_lists_every_subject_once(report_batch):
    from PIL import Image

    manifest, out = report_batch
    shutil.rmtree(out / "_report")
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 subject(s): 3 succeeded, 1 failed, 1 flagged, 0 not done" in proc.stdout
    summary = json.loads((out / "_report" / "summary.json").read_text())
    rows = {s["id"]: s for s in summary["subjects"]}
    assert sorted(s["id"] for s in summary["subjects"]) == ["a", "b", "bad", "c"]  # each once
    assert [s["id"] for s in summary["subjects"]][:2] == ["a", "bad"]  # flagged first, then the failed one
    assert rows["bad"]["status"] == "failed" and "x.png" in rows["bad"]["error"]
    assert rows["a"]["flagged"] and rows["a"]["flags"][0].startswith("dino ") and not rows["b"]["flagged"]
    for sid in ("a", "b", "c"):
        stored = _evaluation(out, sid)
        assert rows[sid]["scores"] == {m: stored["published"][m] for m in METRICS}
        assert rows[sid]["published_step"] == stored["published_step"]
        for name in ("grid.png", "photos.png", "curves.png"):
            assert min(Image.open(out / "_report" / sid / name).size) >= 32
    assert summary["totals"] == {**summary["totals"], "subjects": 4, "succeeded": 3, "failed": 1, "flagged": 1}
    # the manifest adds subjects nothing is stored for yet, as pending
    extra = manifest.with_name("more.yaml")
    extra.write_text(manifest.read_text().replace("subjects:\n", "subjects:\n- id: later\n  token: sks\n  class_noun: dog\n"
                                                                  "  images: imgs/rex/\n", 1))
    proc = run_cli("report", str(out), "--manifest", str(extra))
    assert proc.returncode == 0, proc.stderr
    assert "5 subject(s): 3 succeeded, 1 failed, 1 flagged, 1 not done" in proc.stdout
    proc = run_cli("report", str(out.parent / "nothing-here"))
    assert proc.returncode == 2 and "nothing is stored there" in proc.stderr
    # the batch's own page again (for the browser test): images of unchanged subjects are reused, not redrawn
    drawn = (out / "_report" / "a" / "curves.png").stat().st_mtime_ns
    (out / "_report" / "b" / "curves.png").unlink()
    assert run_cli("report", str(out)).returncode == 0
    assert (out / "_report" / "a" / "curves.png").stat().st_mtime_ns == drawn
    assert (out / "_report" / "b" / "curves.png").exists()  # a missing image is drawn again


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--allow-file-access-from-files", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian's package: apt-get install chromium; CI installs it)")
def test_the_report_page_renders_in_a_real_browser(report_batch, tmp_path: Path):
    import re

    from PIL import Image

    _, out = report_batch
    page = out / "_report" / "index.html"
    summary = json.loads((out / "_report" / "summary.json").read_text())
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", f"{page.as_uri()}#sort=dino&dir=asc").stdout
    cards = re.findall(r'<section class="card ([a-z]+)" data-id="([^"]+)"[^>]*?data-dino="([^"]*)"', dom)
    assert [c[1] for c in cards][:2] == ["a", "bad"], cards  # flagged, then failed, stay on top
    assert sorted(c[1] for c in cards) == ["a", "b", "bad", "c"]
    assert 'data-sorted-by="dino:asc"' in dom  # the page's script ran and sorted by the address's choice
    rest = [(c[1], float(c[2])) for c in cards[2:]]
    assert [v for _, v in rest] == sorted(v for _, v in rest)  # ascending DINO below the ones that need a human
    by_id = {s["id"]: s for s in summary["subjects"]}
    for cls, sid, dino in cards:
        assert cls == ("flagged" if by_id[sid]["flagged"] else by_id[sid]["status"])
        if by_id[sid]["scores"].get("dino") is not None:
            assert float(dino) == by_id[sid]["scores"]["dino"]
    assert "x.png" in dom and "dino 0." in dom  # the failed subject's error line and the flag's reason
    assert "http://" not in dom.replace("http://www.w3.org", "") and "https://" not in dom  # no external requests

    def screenshot(url: str, name: str) -> np.ndarray:
        shot = tmp_path / name
        proc = _chromium("--window-size=1200,1600", f"--screenshot={shot}", url)
        assert shot.exists(), proc.stderr[-2000:]
        return np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def coloured(pixels: np.ndarray) -> float:
        return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).mean())

    pixels = screenshot(page.as_uri(), "report.png")
    assert pixels.std() > 20  # not blank
    # negative control: the same page without the image files beside it (text, badges and borders only)
    (tmp_path / "alone").mkdir()
    shutil.copy(page, tmp_path / "alone" / "index.html")
    without = screenshot((tmp_path / "alone" / "index.html").as_uri(), "alone.png")
    assert coloured(pixels) > 1.5 * coloured(without), (coloured(pixels), coloured(without))  # measured 0.0096 / 0.0042


def test_sigterm_at_a_scored_step_checkpoints_it_unscored_and_the_rerun_scores_it_first(tmp_path: Path, uninterrupted: Path):
    """SIGTERM during step 8 (a step to score): the grace period goes to the checkpoint, not to rendering; the
    rerun scores step 8 from that checkpoint before training on, and ends with the uninterrupted run's points."""
    m = _manifest(tmp_path, "termed")
    proc, _ = start_at_fault(m, tmp_path / "pod1", "pause_at_step=7")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "report:" not in stderr  # no report refresh in the grace period either
    ckpt = torch.load(tmp_path / "termed" / "rex" / "checkpoints" / "step-0000008.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "ScoreDuringTraining" in k]
    assert [p["step"] for p in state["rex"]["points"]] == [4]  # step 8 was not scored before the checkpoint
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got, ref = _evaluation(tmp_path / "termed"), _evaluation(uninterrupted)
    assert _scores(got["points"]) == _scores(ref["points"])
    assert got["published_step"] == ref["published_step"]


def test_the_report_page_shows_stored_values_as_text_and_numbers_only(tmp_path: Path):
    """Whoever can write to the output store writes what the page shows: strings are escaped, statuses are
    the known ones, numbers are numbers (a string where a score belongs is no score)."""
    from dbbatch.quality.report import build
    from dbbatch.store.storage import Storage

    evil = '"><script>alert(1)</script>'
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "_SUCCESS").write_text("r\n")
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({
        "steps": evil, "method": evil, "seconds": {"train": evil}, "loss_curve": [1.0, evil, None],
        "evaluation": {"published_step": evil, "published": {"dino": evil, "clip_i": 0.5}, "flags": [evil],
                       "flagged": True, "points": [{"step": 5, "dino": evil, "clip_i": 0.4}, {"step": evil}]}}))
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "r.json").write_text(json.dumps({"run_id": "r", "subjects": [
        {"id": "b", "status": evil, "message": evil, "error_class": evil}]}))
    summary = build(Storage({}), str(tmp_path))
    page = (tmp_path / "_report" / "index.html").read_text()
    assert "<script>alert" not in page and page.count("<script>") == 1  # the page's own sorting script only
    rows = {r["id"]: r for r in summary["subjects"]}
    assert rows["a"]["scores"]["dino"] is None and rows["a"]["scores"]["clip_i"] == 0.5 and rows["a"]["steps"] is None
    assert rows["a"]["points"] == [{"step": 5, "dino": None, "clip_i": 0.4, "clip_t": None, "class_drift": None, "pres": None}]
    assert rows["b"]["status"] == "failed" and rows["b"]["error"] == evil  # kept as text in summary.json
