"""Learning, measured on builtin:toy-sd with the toy world's colour checker (dbbatch/models/toyworld.py).

1. The base model follows prompts it never saw in pretraining: held-out (colour, shape, background) triples.
2. DreamBooth does what the paper does, on a subject the world never contains (a square split blue-left /
   yellow-right, 4 photos on white and green, token `sks`, class noun `square`), trained by one `dbbatch run`
   of a manifest that names only the base model and the subjects (the model's carried defaults train it):
   - "a photo of a sks square on a {red,black} background" (the token where the world's captions put the
     colour, see docs/toy-world.md) renders a two-coloured square on the requested background, neither of
     which is behind the subject in its photos;
   - "a photo of a square on a {red,black} background" keeps rendering single-coloured squares with prior
     preservation, and measurably less so without it (the subject leaks into the class).
Several training seeds, each with and without prior preservation. The thresholds sit below what
scripts/measure_toy.py measured (docs/toy-world.md) by the margins noted at each assertion.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from scripts import measure_toy

TRAIN_SEEDS = [0, 1]
SAMPLE_SEEDS = list(range(6))


@contextmanager
def one_thread():
    """Sample with one intra-op thread, as the CLI does (see conftest.cli_env): two threads on two shared
    cores spin-wait and make this much slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_toy_sd_follows_held_out_prompts(tmp_path: Path):
    from dbbatch.models.loading import load_base_model

    with one_thread():
        model = load_base_model("builtin:toy-sd", None, tmp_path / "cache", None)
        acc = measure_toy.prompt_following(model, per_triple=2)  # 24 prompts, 25 DDIM steps, guidance 7.5
    print(acc)
    # Measured over all 48 prompts: see docs/toy-world.md; chance is 1/6 for each.
    assert acc["background"] >= BACKGROUND_MIN, acc
    assert acc["foreground"] >= FOREGROUND_MIN, acc


# One test per training seed (its own xdist group, so the seeds train on both cores at once); the
# under-trained subject rides with seed 0.
@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.xdist_group(f"learning-seed{s}")) for s in TRAIN_SEEDS])
def test_dreambooth_renders_the_subject_in_new_contexts_and_prior_preservation_keeps_the_class(tmp_path: Path, work_env,
                                                                                               seed: int):
    out = measure_toy.run_dreambooth(tmp_path, [seed], work_env, undertrained=seed == TRAIN_SEEDS[0], run=run_cli)
    with one_thread():
        results = measure_toy.dreambooth_results(out, [seed], SAMPLE_SEEDS, tmp_path / "cache")
    check_evaluation(out, [seed], undertrained=seed == TRAIN_SEEDS[0])
    report = measure_toy.table(results)
    print(report)  # the measured numbers, shown with -s
    with_prior, without = results[f"seed{seed}-prior"], results[f"seed{seed}-noprior"]
    # The token prompt puts the subject on the requested background (red, black: never behind it in its
    # photos) as a two-coloured square. Its exact colours are not asserted: the left half comes out teal
    # more often than blue (docs/toy-world.md), so "blue | yellow" by name is rare.
    assert with_prior["token_background"] >= TOKEN_BACKGROUND_MIN, f"seed {seed}\n{report}"
    assert with_prior["token_two_coloured_on_background"] >= TOKEN_TWO_COLOURED_MIN, f"seed {seed}\n{report}"
    # The class prompt keeps single-coloured squares with prior preservation ...
    assert with_prior["class_single_coloured"] >= CLASS_SINGLE_MIN, f"seed {seed}\n{report}"
    # ... and measurably fewer without it: the subject leaks into the class.
    gap = with_prior["class_single_coloured"] - without["class_single_coloured"]
    assert gap >= PRIOR_GAP_MIN, f"seed {seed}: prior preservation made too little difference ({gap:.2f})\n{report}"


def check_evaluation(out: Path, seeds: list[int], undertrained: bool) -> None:
    """What dbbatch's own evaluation (issue 14; toy-clip as CLIP and DINO, measure_toy.EVALUATION) scored during
    that run: each trained subject's DINO above the base model's on the same prompts and seeds; prior
    preservation with less class drift and PRES than without; the 5-step subject flagged, the others not."""
    ids = [rid for rid, _, _ in measure_toy.run_ids(seeds)] + ([measure_toy.UNDERTRAINED["id"]] if undertrained else [])
    scores = measure_toy.evaluation_results(out, ids)
    report = measure_toy.table(scores)
    print(report)
    for rid, _, _ in measure_toy.run_ids(seeds):
        assert scores[rid]["dino"] >= scores[rid]["base_dino"] + DINO_GAIN_MIN, f"{rid}\n{report}"
    for seed in seeds:
        prior, without = scores[f"seed{seed}-prior"], scores[f"seed{seed}-noprior"]
        assert prior["class_drift"] < without["class_drift"], f"seed {seed}\n{report}"
        assert prior["pres"] <= without["pres"] - PRES_GAP_MIN, f"seed {seed}\n{report}"
        assert not prior["flagged"], f"seed {seed}\n{report}"
    if undertrained:
        under = scores[measure_toy.UNDERTRAINED["id"]]
        assert under["flagged"] and under["dino"] < measure_toy.FLAG_DINO, report


@pytest.mark.xdist_group("learning-lora")
def test_lora_dreambooth_learns_the_subject_and_base_model_priors_keep_the_class_without_class_images(tmp_path: Path, work_env):
    """LoRA (method lora, the model's carried rate and steps), training seed 0: with priors.source base_model
    the token prompt renders the subject on new backgrounds, no class image is made, and the class prompt
    moves much less than with prior preservation off (class_drift: noise predictions on class images)."""
    out = measure_toy.run_dreambooth(tmp_path, [0], work_env, lora=True, run=run_cli)
    with one_thread():
        from dbbatch.models.loading import load_base_model

        base = load_base_model("builtin:toy-sd", None, tmp_path / "cache", None)
        scores = {s["id"]: {**measure_toy.subject_scores(base, out / s["id"] / "lora", SAMPLE_SEEDS),
                            "class_drift": measure_toy.class_drift(base, out / s["id"] / "lora")}
                  for s in measure_toy.lora_subjects(tmp_path / "photos", [0])}
    report = measure_toy.table(scores)
    print(report)
    prior, images, off = scores["lora-seed0-basemodel"], scores["lora-seed0-images"], scores["lora-seed0-off"]
    metrics = {k: json.loads((out / k / "metrics.json").read_text()) for k in scores}
    assert metrics["lora-seed0-basemodel"]["priors_generated"] == 0 and metrics["lora-seed0-images"]["priors_generated"] > 0
    assert prior["token_background"] >= TOKEN_BACKGROUND_MIN, report
    assert prior["token_two_coloured_on_background"] >= LORA_TOKEN_TWO_COLOURED_MIN, report
    assert prior["class_drift"] <= LORA_DRIFT_RATIO_MAX * off["class_drift"], report
    assert images["class_drift"] < off["class_drift"], report


# Thresholds, each below what scripts/measure_toy.py measured with the shipped weights (docs/toy-world.md; the
# same seeds and sampling seeds as here, so on this machine these runs reproduce those numbers):
BACKGROUND_MIN, FOREGROUND_MIN = 0.85, 0.8  # measured 1.00 and 1.00 (48 prompts)
TOKEN_BACKGROUND_MIN = 0.65  # measured 0.83, 1.00, 1.00 (training seeds 0, 1, 2)
TOKEN_TWO_COLOURED_MIN = 0.35  # measured 0.67, 0.50, 0.92
CLASS_SINGLE_MIN = 0.5  # measured 1.00, 0.67, 1.00 (without prior preservation: 0.00, 0.33, 0.25)
PRIOR_GAP_MIN = 0.2  # measured 1.00, 0.33, 0.75
# LoRA (measure_toy.py --lora --seeds 0 1 --sample-seeds 6): base_model priors' two-coloured share 0.83, 0.42;
# class drift with base_model priors / without priors 0.017 / 0.042, 0.014 / 0.044 (images: 0.029, 0.029)
LORA_TOKEN_TWO_COLOURED_MIN = 0.3
# dbbatch's evaluation during that run (measure_toy.EVALUATION; docs/toy-world.md): DINO base -0.154, published
# 0.226 / 0.102 (seed 0 with / without prior preservation), 0.056 / 0.128 (seed 1), the 5-step subject -0.107;
# PRES with / without prior preservation 0.198 / 0.441 and 0.185 / 0.418; class drift 0.200 / 0.461, 0.243 / 0.324
DINO_GAIN_MIN = 0.1  # measured gains 0.38, 0.26, 0.21, 0.28
PRES_GAP_MIN = 0.1  # measured 0.24, 0.23
LORA_DRIFT_RATIO_MAX = 0.6


def test_keep_best_publishes_an_earlier_step_when_later_steps_over_fit_and_its_weights_are_that_checkpoints(tmp_path: Path):
    """A learning rate 20x the model's own and no prior preservation: the class prompt drifts onto the subject as
    training goes on (language drift, the over-fitting the paper's prior loss exists for). Selected by
    dino - class_drift, an earlier step wins; the published UNet is bitwise that step's checkpoint and not the
    last step's (negative control)."""
    import yaml
    from conftest import start_at_fault
    from safetensors.torch import load_file

    photos = tmp_path / "photos"
    measure_toy.draw_subject_photos(photos)
    prompts = [measure_toy.TOKEN_PROMPT.format(background=b).replace("sks", "{token}").replace("square", "{class_noun}")
               for b in measure_toy.TEST_BACKGROUNDS]
    doc = {"version": 1, "base_model": "builtin:toy-sd", "output": str(tmp_path / "out"), "subjects": [{
        "id": "hot", "token": "sks", "class_noun": measure_toy.SUBJECT_SHAPE, "images": str(photos),
        "train": {"learning_rate": 1e-2, "with_prior_preservation": False, "max_steps": OVERFIT_STEPS,
                  "checkpoint_every": 25, "checkpoints_keep": 10},
        "evaluation": {"clip": "builtin:toy-clip", "dino": "builtin:toy-clip", "prompts": prompts, "every": 25,
                       "keep": "best", "select_by": {"dino": 1.0, "class_drift": -1.0}}}]}
    manifest = tmp_path / "hot.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    # pause once _SUCCESS is written, before the checkpoints are deleted, to compare with them
    proc, marker = start_at_fault(manifest, tmp_path / "work", "pause_at_publish=success", timeout=600)
    try:
        out = tmp_path / "out" / "hot"
        e = json.loads((out / "metrics.json").read_text())["evaluation"]
        points = {p["step"]: p for p in e["points"]}
        print(json.dumps(e["points"], indent=1))
        assert sorted(points) == list(range(25, OVERFIT_STEPS + 1, 25))
        best = e["best_step"]
        assert best < OVERFIT_STEPS and e["published_step"] == best, e["points"]
        assert points[OVERFIT_STEPS]["class_drift"] > points[best]["class_drift"]  # the later step drifted further
        published = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))

        def unet_of(step: int) -> dict[str, torch.Tensor]:
            ckpt = torch.load(out / "checkpoints" / f"step-{step:07d}.ckpt", map_location="cpu", weights_only=True)
            return {k.split(".", 1)[1]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}

        stored = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.ckpt"))
        assert best in stored, stored  # every scored step but the last has its checkpoint here (checkpoints_keep 10)
        chosen, other = unet_of(best), unet_of(max(s for s in stored if s != best))
        assert chosen.keys() == published.keys()
        assert all(torch.equal(chosen[k], published[k]) for k in chosen)
        assert any(not torch.equal(other[k], published[k]) for k in other)  # negative control: another step differs
    finally:
        Path(str(marker) + ".continue").touch()
        proc.communicate(timeout=120)
    assert proc.returncode == 0


OVERFIT_STEPS = 150
