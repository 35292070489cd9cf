"""End to end, for each model family: `dbbatch run` on a 2-subject manifest produces every promised output; the
model folder loads with the family's diffusers pipeline and reproduces dbbatch's own samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FAMILY_ARCHS, cli_env, draw_subject, pipeline_class, render_stored_samples, run_cli, tiny_manifest

OUTPUTS = ["_SUCCESS", "metrics.json", "config.yaml", "samples/grid.png", "model/model_index.json",
           "model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/model.safetensors"]


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_run_two_subjects_then_rerun_skips(tmp_path: Path, work_env, family: str):
    draw_subject(tmp_path / "imgs" / "rex", (220, 30, 30))
    draw_subject(tmp_path / "imgs" / "tom", (30, 60, 220), n=2)
    m = tiny_manifest(tmp_path / "m.yaml", "out", [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"},
        {"id": "tom", "token": "ohwx", "class_noun": "cat", "images": ["imgs/tom/img0.png", "imgs/tom/img1.png"],
         "train": {"max_steps": 4}},
    ], base_model=f"builtin:{FAMILY_ARCHS[family]}")
    proc = run_cli("run", str(m), env=work_env, cwd=Path("/"))  # relative paths resolve against the manifest
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    for sid, steps in (("rex", 6), ("tom", 4)):
        for rel in OUTPUTS:
            assert (out / sid / rel).is_file(), f"{sid}/{rel} missing"
        metrics = json.loads((out / sid / "metrics.json").read_text())
        assert metrics["steps"] == steps and len(metrics["loss_curve"]) == steps
        assert set(metrics["seconds"]) >= {"images", "train", "sample", "publish"}
        assert len(list((out / sid / "samples").glob("prompt*-seed*.png"))) == 2 * 2  # (prompt + class prompt) x 2 seeds
        cfg = yaml.safe_load((out / sid / "config.yaml").read_text())
        assert cfg["subject"]["train"]["max_steps"] == steps
        assert not list((out / sid / "checkpoints").glob("*.ckpt")), "checkpoints are pruned once a subject is done"
    run_report = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert [s["status"] for s in run_report["subjects"]] == ["succeeded", "succeeded"]

    # the saved model is a plain diffusers folder of the family's pipeline class, with every component it
    # names; loaded as a user loads it, it makes the very images dbbatch stored as samples
    index = json.loads((out / "rex" / "model" / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class(family).__name__
    assert all((out / "rex" / "model" / name).is_dir() for name, value in index.items()
               if isinstance(value, list) and value[0] is not None)
    pipe = pipeline_class(family).from_pretrained(str(out / "rex" / "model"))
    made, stored = render_stored_samples(pipe, out / "rex", steps=2)
    assert all(np.array_equal(a, b) for a, b in zip(made, stored)), "the loaded model renders other images"
    from dbbatch.models.builtin import BUILTIN_VERSION

    cached = Path(work_env["DBBATCH_WORK_DIR"]) / "cache" / "models" / f"builtin-{FAMILY_ARCHS[family]}-v{BUILTIN_VERSION}"
    base = pipeline_class(family).from_pretrained(str(cached))
    plain, _ = render_stored_samples(base, out / "rex", steps=2)
    assert not all(np.array_equal(a, b) for a, b in zip(plain, stored)), "the base model makes the same images"

    again = run_cli("run", str(m), env=work_env)
    assert again.returncode == 0, again.stderr
    reports = sorted((out / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(reports) == 2
    assert [s["status"] for s in json.loads(reports[-1].read_text())["subjects"]] == ["skipped", "skipped"]
    assert "generating" not in again.stderr and "checkpoint" not in again.stderr


def test_fork_server_children_match_fresh_interpreters_bitwise(tmp_path: Path):
    """The suite runs most `dbbatch` commands as children of a fork server that imported dbbatch once
    (tests/forkserver.py). Held here: the same manifest run by a fresh `python -m dbbatch` and by a forked child
    writes the same weights, samples and loss curve, bit for bit; a different training seed (the negative
    control) does not, so the comparison would catch a child that trained differently."""
    draw_subject(tmp_path / "imgs" / "rex")
    subject = {"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/", "train": {"max_steps": 3}}

    def outputs(name: str, fresh: bool, seed: int = 0) -> dict[str, bytes]:
        m = tiny_manifest(tmp_path / f"{name}.yaml", name, [{**subject, "train": {"max_steps": 3, "seed": seed}}])
        proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work")), fresh=fresh)
        assert proc.returncode == 0, proc.stderr
        rex = tmp_path / name / "rex"
        files = {str(p.relative_to(rex)): p.read_bytes() for p in sorted(rex.rglob("*"))
                 if p.is_file() and p.suffix in (".safetensors", ".png")}
        files["loss_curve"] = json.dumps(json.loads((rex / "metrics.json").read_text())["loss_curve"]).encode()
        return files

    fresh, forked = outputs("fresh", fresh=True), outputs("forked", fresh=False)
    assert len(fresh) > 5 and fresh.keys() == forked.keys()
    assert [k for k in fresh if fresh[k] != forked[k]] == []
    reseeded = outputs("reseeded", fresh=False, seed=1)
    assert fresh["loss_curve"] != reseeded["loss_curve"]
    assert fresh["model/unet/diffusion_pytorch_model.safetensors"] != reseeded["model/unet/diffusion_pytorch_model.safetensors"]
