"""Learning, measured on builtin:toy-sd with the toy world's colour checker (dbbatch/toyworld.py).

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

import torch

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
    from dbbatch.models import load_base_model

    with one_thread():
        model = load_base_model("builtin:toy-sd", None, tmp_path / "cache", None)
        acc = measure_toy.prompt_following(model, per_triple=2)  # 24 prompts, 25 DDIM steps, guidance 7.5
    print(acc)
    # Measured over all 48 prompts: see docs/toy-world.md; chance is 1/6 for each.
    assert acc["background"] >= BACKGROUND_MIN, acc
    assert acc["foreground"] >= FOREGROUND_MIN, acc


def test_dreambooth_renders_the_subject_in_new_contexts_and_prior_preservation_keeps_the_class(tmp_path: Path, work_env):
    out = measure_toy.run_dreambooth(tmp_path, TRAIN_SEEDS, work_env)
    with one_thread():
        results = measure_toy.dreambooth_results(out, TRAIN_SEEDS, SAMPLE_SEEDS, tmp_path / "cache")
    report = measure_toy.table(results)
    print(report)  # the measured numbers, shown with -s
    for seed in TRAIN_SEEDS:
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


def test_lora_dreambooth_learns_the_subject_and_base_model_priors_keep_the_class_without_class_images(tmp_path: Path, work_env):
    """LoRA (method lora, the model's carried rate and steps), training seed 0: with priors.source base_model
    the token prompt renders the subject on new backgrounds, no class image is made, and the class prompt
    moves much less than with prior preservation off (class_drift: noise predictions on class images)."""
    out = measure_toy.run_dreambooth(tmp_path, [0], work_env, lora=True)
    with one_thread():
        from dbbatch.models import load_base_model

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
LORA_DRIFT_RATIO_MAX = 0.6
