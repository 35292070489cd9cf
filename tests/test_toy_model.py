"""builtin:toy-sd as shipped: the weights are the ones the committed log describes, the pretraining script
reproduces that log's first steps, and the model loads everywhere a diffusers folder does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli

from dbbatch.models.assets import PRETRAINED, PRETRAINED_CLIP, WEIGHT_SUMS

TOY_SD = PRETRAINED["toy-sd"]
LOG = TOY_SD / "pretrain_log.jsonl"


@pytest.mark.parametrize("folder", [TOY_SD, PRETRAINED_CLIP["toy-clip"]], ids=["toy-sd", "toy-clip"])
def test_shipped_weights_match_their_sha256(folder: Path):
    sums = [line.split("  ", 1) for line in (folder / WEIGHT_SUMS).read_text().splitlines() if line.strip()]
    assert {name for _, name in sums} == {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}
    for digest, name in sums:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    total = sum((folder / name).stat().st_size for _, name in sums)
    assert total < 20 * 2**20, f"{folder.name}: {total / 2**20:.1f} MiB of weights"


def test_pretraining_script_reproduces_the_committed_logs_first_steps():
    """--check-steps 3: the VAE, UNet+text-encoder (on the shipped VAE) and CLIP stages' first 3 steps from
    the fixed seed, compared with the log written when the shipped weights were trained."""
    logged = {(r["stage"], r["step"]): r for r in map(json.loads, LOG.read_text().splitlines()) if "step" in r}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_toy.py"), "--check-steps", "3"],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = {r["stage"] for r in checked if (r["stage"], r["step"]) in logged}
    assert {"vae", "sd"} <= stages, f"the committed log lacks the first steps: {sorted(logged)[:10]}"
    if any(stage == "clip" for stage, _ in logged):
        assert "clip" in stages
    for r in checked:
        if (r["stage"], r["step"]) not in logged:
            continue
        expected = logged[r["stage"], r["step"]]
        # one thread, same seed: equal to float rounding across CPUs and BLAS builds
        assert r["loss"] == pytest.approx(expected["loss"], rel=2e-3, abs=1e-6), (r, expected)


def test_toy_sd_written_as_a_folder_loads_in_diffusers(tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "toy-sd"
    proc = run_cli("tiny-model", "--arch", "toy-sd", str(out))
    assert proc.returncode == 0, proc.stderr
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert (out / "dbbatch_defaults.json").is_file()  # a user's copy carries the same training defaults


def test_toy_clip_loads_and_tells_captions_apart():
    import torch
    from PIL import Image

    from dbbatch.models import toyworld
    from dbbatch.models.assets import load_builtin_clip

    model, tokenizer, processor = load_builtin_clip("toy-clip")
    scene = toyworld.Scene("red", "circle", "blue", 16, 16, 9)
    captions = [toyworld.caption(scene, "full"), toyworld.caption(toyworld.Scene("blue", "circle", "red", 0, 0, 0), "full")]
    pixels = processor(images=[Image.fromarray(toyworld.render(scene))], return_tensors="pt").pixel_values
    assert pixels.shape[-2:] == (toyworld.SIZE, toyworld.SIZE)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
    assert logits[0, 0] > logits[0, 1]
