"""End to end: `dbbatch run` on a 2-subject manifest produces every promised output, which loads and samples."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import draw_subject, run_cli, tiny_manifest

OUTPUTS = ["_SUCCESS", "metrics.json", "config.yaml", "samples/grid.png", "model/model_index.json",
           "model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/model.safetensors"]


def test_run_two_subjects_then_rerun_skips(tmp_path: Path, work_env):
    draw_subject(tmp_path / "imgs" / "rex", (220, 30, 30))
    draw_subject(tmp_path / "imgs" / "tom", (30, 60, 220), n=2)
    m = tiny_manifest(tmp_path / "m.yaml", "out", [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"},
        {"id": "tom", "token": "ohwx", "class_noun": "cat", "images": ["imgs/tom/img0.png", "imgs/tom/img1.png"],
         "train": {"max_steps": 4}},
    ])
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

    # the saved model is a plain diffusers folder that loads and samples
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "rex" / "model"))
    img = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)

    again = run_cli("run", str(m), env=work_env)
    assert again.returncode == 0, again.stderr
    reports = sorted((out / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(reports) == 2
    assert [s["status"] for s in json.loads(reports[-1].read_text())["subjects"]] == ["skipped", "skipped"]
    assert "generating" not in again.stderr and "checkpoint" not in again.stderr
