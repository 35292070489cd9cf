"""Class priors: deterministic per index, content-addressed, shared by subjects and runs, topped up not redone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, draw_subject, run_cli, tiny_manifest
from PIL import Image

from dbbatch.batch.priors import image_name, missing_indices, prior_key, prior_spec
from dbbatch.config.settings import PriorConfig


def test_key_covers_what_changes_pixels_but_not_the_count():
    base = prior_spec("builtin:tiny-sd:v1", "a photo of dog", 64, PriorConfig(num_images=8))
    assert prior_key(base) == prior_key(prior_spec("builtin:tiny-sd:v1", "a photo of dog", 64, PriorConfig(num_images=50)))
    for other in (prior_spec("another-model", "a photo of dog", 64, PriorConfig()),
                  prior_spec("builtin:tiny-sd:v1", "a photo of cat", 64, PriorConfig()),
                  prior_spec("builtin:tiny-sd:v1", "a photo of dog", 32, PriorConfig()),
                  prior_spec("builtin:tiny-sd:v1", "a photo of dog", 64, PriorConfig(steps=10)),
                  prior_spec("builtin:tiny-sd:v1", "a photo of dog", 64, PriorConfig(seed=1)),
                  prior_spec("builtin:tiny-sd:v1", "a photo of dog", 64, PriorConfig(guidance_scale=3.0))):
        assert prior_key(other) != prior_key(base)
    assert missing_indices({image_name(0), image_name(2)}, 4) == [1, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dbbatch.models.loading import load_base_model

    return load_base_model("builtin:tiny-sd", None, tmp_path_factory.mktemp("cache"), None)


def test_image_i_is_the_same_alone_or_in_a_batch(tiny):
    from dbbatch.models.sampling import generate

    batch = generate(tiny, ["a photo of dog"] * 3, [5, 6, 7], 32, 4, 7.5, batch_size=3)
    alone = generate(tiny, ["a photo of dog"], [7], 32, 4, 7.5, batch_size=1)
    again = generate(tiny, ["a photo of dog"], [7], 32, 4, 7.5, batch_size=1)
    assert np.array_equal(np.asarray(alone[0]), np.asarray(again[0]))
    # batching may change float summation order; after rounding to 8-bit pixels at most 1 level apart
    assert np.abs(np.asarray(batch[2], dtype=int) - np.asarray(alone[0], dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[2]))  # other seeds, other images


def test_subjects_of_one_class_share_priors_and_a_partial_cache_is_topped_up(tmp_path: Path):
    for name in ("rex", "max"):
        draw_subject(tmp_path / "imgs" / name)
    subjects = [{"id": n, "token": "sks", "class_noun": "dog", "images": f"imgs/{n}/"} for n in ("rex", "max")]
    m = tiny_manifest(tmp_path / "m.yaml", "out", subjects)
    m.write_text(m.read_text().replace("max_steps: 6", "max_steps: 2").replace("num_images: 2", "num_images: 3"))
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))
    proc = run_cli("run", str(m), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("generating") == 1  # rex makes them, max reuses them
    metrics = {n: json.loads((tmp_path / "out" / n / "metrics.json").read_text()) for n in ("rex", "max")}
    assert metrics["rex"]["priors_generated"] == 3 and metrics["max"]["priors_generated"] == 0
    (key_dir,) = (tmp_path / "out" / "_priors").iterdir()
    spec = json.loads((key_dir / "prior.json").read_text())
    assert spec["class_prompt"] == "a photo of dog" and spec["base_model"].startswith("builtin:tiny-sd")
    kept = {p.name: p.read_bytes() for p in key_dir.glob("*.png")}
    assert sorted(kept) == ["000000.png", "000001.png", "000002.png"]

    # another manifest, one more image wanted, one image lost: only the missing two are made, the rest reused
    (key_dir / "000001.png").unlink()
    m2 = tmp_path / "m2.yaml"
    m2.write_text(m.read_text().replace("num_images: 3", "num_images: 4").replace("output: out", "output: out2")
                  + f"prior_cache: {tmp_path / 'out' / '_priors'}\n")
    proc = run_cli("run", str(m2), "--only", "rex", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "generating 2 of 4 class images" in proc.stderr
    assert (key_dir / "000000.png").read_bytes() == kept["000000.png"]
    assert (key_dir / "000001.png").read_bytes() == kept["000001.png"]  # the same seed makes the same image
    assert (key_dir / "000003.png").exists()


def test_samples_already_stored_are_not_made_again(tmp_path: Path):
    draw_subject(tmp_path / "imgs" / "rex")
    m = tiny_manifest(tmp_path / "m.yaml", "out", [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"}])
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))
    assert run_cli("run", str(m), env=env).returncode == 0
    samples = tmp_path / "out" / "rex" / "samples"
    before = {p.name: p.stat().st_mtime_ns for p in samples.glob("prompt*.png")}
    lost = sorted(before)[0]
    (samples / lost).unlink()
    (tmp_path / "out" / "rex" / "_SUCCESS").unlink()  # as if the pod died while sampling
    proc = run_cli("run", str(m), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "already stored; loading it instead of training" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in samples.glob("prompt*.png")}
    assert set(after) == set(before)
    assert [n for n in before if after[n] != before[n]] == [lost]
    assert Image.open(samples / "grid.png").size[0] > Image.open(samples / lost).size[0]
