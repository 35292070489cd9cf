"""Measure builtin:toy-sd with the toy world's colour checker: prompt following, and DreamBooth on a subject
the world never contains (a square split blue-left / yellow-right; token `sks`, class noun `square`).

    python scripts/measure_toy.py [--seeds 0 1 2] [--out /tmp/toy-measure] [--json results.json]

Prompt following: the 48 held-out prompts (12 triples never seen in pretraining x 4 sampling seeds), 25 DDIM
steps, guidance 7.5. DreamBooth: one `dbbatch run` of a manifest that names only the base model and its
subjects (so the model-carried defaults are what trains), each training seed with and without prior
preservation; then "a photo of sks square on a {colour} background" for backgrounds absent from the photos,
and the class prompt "a photo of a square on a {colour} background". tests/test_learning.py runs the same
functions with fewer seeds and asserts thresholds below what this measures.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dbbatch.models import toyworld  # noqa: E402

SUBJECT_LEFT, SUBJECT_RIGHT, SUBJECT_SHAPE = "blue", "yellow", "square"
PHOTO_BACKGROUNDS = ("white", "green", "white", "green")  # the 4 photos
TEST_BACKGROUNDS = ("red", "black")  # never behind the subject in its photos, neither of its colours
# "a photo of a sks square": the token where the world's captions put the colour (see docs/toy-world.md: without
# the "a", the text encoder reads "sks" as if it were "a" and the token prompt is 1.7% away from the class prompt).
TOKEN_PROMPT = "a photo of a sks square on a {background} background"
CLASS_PROMPT = "a photo of a square on a {background} background"


def draw_subject_photos(folder: Path, seed: int = 0, backgrounds: tuple[str, ...] = PHOTO_BACKGROUNDS) -> list[Path]:
    """The subject's photos: the split square at random sizes and places, one per background."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for i, background in enumerate(backgrounds):
        scene = toyworld.random_scene(rng, triple=(SUBJECT_LEFT, SUBJECT_SHAPE, background))
        img = toyworld.render_split(SUBJECT_LEFT, SUBJECT_RIGHT, SUBJECT_SHAPE, background, scene.cx, scene.cy, scene.radius)
        files.append(folder / f"{i}.png")
        Image.fromarray(img).save(files[-1])
    return files


def prompt_following(model: Any, per_triple: int = 4, steps: int = 25, guidance: float = 7.5) -> dict[str, float]:
    """The checker's accuracies over the held-out prompts (sampling seed = prompt index)."""
    from dbbatch.models.sampling import generate

    prompts = toyworld.held_out_prompts(per_triple)
    imgs = generate(model, [p for p, _ in prompts], list(range(len(prompts))), toyworld.SIZE, steps, guidance,
                    batch_size=len(prompts))
    bg = [toyworld.background_colour(np.asarray(im)) == t[2] for im, (_, t) in zip(imgs, prompts)]
    fg = [toyworld.foreground_colour(np.asarray(im)) == t[0] for im, (_, t) in zip(imgs, prompts)]
    return {"prompts": len(prompts), "background": float(np.mean(bg)), "foreground": float(np.mean(fg)),
            "both": float(np.mean([a and b for a, b in zip(bg, fg)]))}


# LoRA (train.method lora, the model's carried rate and steps): prior preservation from class images, from the
# base model's own prediction (priors.source base_model), and off
LORA_VARIANTS = {"images": {}, "base_model": {"priors": {"source": "base_model"}},
                 "off": {"train": {"with_prior_preservation": False}}}


def lora_subjects(photos: Path, seeds: list[int]) -> list[dict[str, Any]]:
    out = []
    for seed in seeds:
        for name, extra in LORA_VARIANTS.items():
            train = {"method": "lora", "seed": seed, **extra.get("train", {})}
            out.append({"id": f"lora-seed{seed}-{name.replace('_', '')}", "token": "sks", "class_noun": SUBJECT_SHAPE,
                        "images": str(photos), "train": train, **({"priors": extra["priors"]} if "priors" in extra else {})})
    return out


# Scored during training (issue 14) with the toy world's CLIP as CLIP and as DINO: the instance prompt and the
# token prompt on the test backgrounds, 8 seeds, at the last step (and the base model's step 0).
EVALUATION_PROMPTS = ["a photo of a {token} {class_noun}"] + [
    TOKEN_PROMPT.format(background=b).replace("sks", "{token}").replace(SUBJECT_SHAPE, "{class_noun}") for b in TEST_BACKGROUNDS]
# below: flagged. Patch-token cosines (evaluators.py) can be negative: measured, the base model -0.15, the 5-step
# subject -0.11, the 500-step ones 0.06-0.23 (docs/toy-world.md)
FLAG_DINO = -0.05
EVALUATION = {"clip": "builtin:toy-clip", "dino": "builtin:toy-clip", "prompts": EVALUATION_PROMPTS,
              "seeds": list(range(8)), "every": 500, "flag_below": {"dino": FLAG_DINO}}
UNDERTRAINED = {"id": "undertrained", "train": {"max_steps": 5}}  # deliberately under-trained: few steps


def run_ids(seeds: list[int]) -> list[tuple[str, int, bool]]:
    return [(f"seed{s}-{'prior' if p else 'noprior'}", s, p) for s in seeds for p in (True, False)]


def dreambooth_manifest(path: Path, output: Path, photos: Path, seeds: list[int], undertrained: bool = False) -> Path:
    """The base model, `evaluation` and the subjects: the training settings are the ones toy-sd carries. With
    `undertrained`, also a subject of a few steps (UNDERTRAINED)."""
    import yaml

    subjects = [{"id": rid, "token": "sks", "class_noun": SUBJECT_SHAPE, "images": str(photos),
                 "train": {"seed": seed, "with_prior_preservation": prior}} for rid, seed, prior in run_ids(seeds)]
    if undertrained:
        subjects.append({**UNDERTRAINED, "token": "sks", "class_noun": SUBJECT_SHAPE, "images": str(photos)})
    doc = {"version": 1, "base_model": "builtin:toy-sd", "output": str(output), "defaults": {"evaluation": EVALUATION},
           "subjects": subjects}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_dreambooth(work: Path, seeds: list[int], env: dict[str, str], lora: bool = False, undertrained: bool = False,
                   run: Any = None) -> Path:
    """Draw the photos, `dbbatch run` every (seed, prior) subject (and the under-trained one), or with `lora`
    every (seed, LORA_VARIANTS) subject; returns the output folder. `run(*args, env=, cwd=, timeout=)` runs the
    command (the tests' fork server); default a new interpreter."""
    import yaml

    photos = work / "photos"
    draw_subject_photos(photos)
    manifest = dreambooth_manifest(work / "dreambooth.yaml", work / "out", photos, seeds, undertrained)
    if lora:
        doc = {"version": 1, "base_model": "builtin:toy-sd", "output": str(work / "out"), "subjects": lora_subjects(photos, seeds)}
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    if run is not None:
        proc = run("run", str(manifest), env=env, cwd=work, timeout=1800)
    else:
        proc = subprocess.run([sys.executable, "-m", "dbbatch", "run", str(manifest)], capture_output=True, text=True,
                              env=env, cwd=work, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"dbbatch run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return work / "out"


def subject_scores(model: Any, model_dir: Path, sample_seeds: list[int], steps: int = 25, guidance: float = 7.5,
                   token_prompt: str = TOKEN_PROMPT, class_prompt: str = CLASS_PROMPT) -> dict[str, float]:
    """Load one fine-tuned model's weights into `model` (restored after) and read its samples. `model_dir` is
    a subject's model/ folder (full fine-tuning) or its lora/ folder (the adapters are attached, then removed)."""
    from diffusers import UNet2DConditionModel

    from dbbatch.models import lora
    from dbbatch.models.lora_export import DIFFUSERS_FILE, load_lora_folder
    from dbbatch.models.sampling import generate

    if (model_dir / DIFFUSERS_FILE).is_file():
        load_lora_folder(model, model_dir)
    else:
        model.snapshot(("unet", "text_encoder"))
        model.unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).state_dict())
        if (model_dir / "text_encoder").is_dir():
            from transformers import CLIPTextModel

            model.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).state_dict())
    try:
        jobs = [(kind, bg, seed) for kind in ("token", "class") for bg in TEST_BACKGROUNDS for seed in sample_seeds]
        prompts = [(token_prompt if kind == "token" else class_prompt).format(background=bg) for kind, bg, _ in jobs]
        imgs = [np.asarray(im) for im in generate(model, prompts, [s for _, _, s in jobs], toyworld.SIZE, steps,
                                                  guidance, batch_size=len(prompts))]
    finally:
        lora.detach(model)
        model.restore()
    out: dict[str, list[bool]] = {}
    for (kind, bg, _), img in zip(jobs, imgs):
        on_bg = toyworld.background_colour(img) == bg
        split = toyworld.is_split_subject(img, SUBJECT_LEFT, SUBJECT_RIGHT)
        out.setdefault(f"{kind}_background", []).append(on_bg)
        out.setdefault(f"{kind}_split", []).append(split)
        out.setdefault(f"{kind}_split_on_background", []).append(split and on_bg)
        out.setdefault(f"{kind}_single_coloured", []).append(toyworld.is_single_coloured(img))
        halves = toyworld.split_colours(img)  # weaker than split: two different colours side by side
        two = halves is not None and halves[0] != halves[1]
        out.setdefault(f"{kind}_two_coloured", []).append(two)
        out.setdefault(f"{kind}_two_coloured_on_background", []).append(two and on_bg)
    return {k: float(np.mean(v)) for k, v in out.items()}


def class_drift(model: Any, lora_dir: Path, images: int = 32, seed: int = 0) -> float:
    """How far the adapters in `lora_dir` moved the class prompt: on noisy latents of toy-world squares (single-
    coloured, on every background; random timesteps and noise, fixed by `seed`), the mean squared difference
    between the noise the base model and the base model + adapters predict for "a photo of a square", relative
    to the base prediction's mean square. 0: the class prompt is untouched. (Sampled images are too chaotic a
    measure: a tiny change early in sampling ends in another image.)"""
    import torch
    from diffusers import DDPMScheduler
    from PIL import Image

    from dbbatch.models import lora
    from dbbatch.models.lora_export import load_lora_folder
    from dbbatch.models.toyworld import render
    from dbbatch.train.images import to_tensor

    rng = random.Random(seed)
    scenes = [toyworld.random_scene(rng, (c, SUBJECT_SHAPE, b)) for c, b in
              [(c, b) for c in toyworld.COLOURS for b in toyworld.COLOURS if b != c][:images]]
    pixels = to_tensor([Image.fromarray(render(s)) for s in scenes])
    g = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        states = model.encode(["a photo of a square"])["encoder_hidden_states"].expand(len(latents), -1, -1)
        base = model.unet(noisy, t, encoder_hidden_states=states).sample
        load_lora_folder(model, lora_dir)
        try:
            states = model.encode(["a photo of a square"])["encoder_hidden_states"].expand(len(latents), -1, -1)
            tuned = model.unet(noisy, t, encoder_hidden_states=states).sample
        finally:
            lora.detach(model)
    return float((tuned - base).pow(2).mean() / base.pow(2).mean())


def dreambooth_results(out: Path, seeds: list[int], sample_seeds: list[int], cache: Path) -> dict[str, dict[str, float]]:
    from dbbatch.models.loading import load_base_model

    base = load_base_model("builtin:toy-sd", None, cache, None)
    return {rid: subject_scores(base, out / rid / "model", sample_seeds) for rid, _, _ in run_ids(seeds)}


def evaluation_results(out: Path, ids: list[str]) -> dict[str, dict[str, float]]:
    """Each subject's scores from its metrics.json: the base model's (step 0) and the published step's."""
    rows = {}
    for sid in ids:
        e = json.loads((out / sid / "metrics.json").read_text())["evaluation"]
        rows[sid] = {**{f"base_{m}": e["baseline"][m] for m in ("dino", "clip_i")},
                     **{m: e["published"][m] for m in ("dino", "clip_i", "clip_t", "class_drift", "pres")},
                     "flagged": float(e["flagged"])}
    return rows


def table(results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {rid} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for rid, r in results.items()]
    return "\n".join(lines)


def main() -> int:
    import os
    import time

    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sample-seeds", type=int, default=8, help="sampling seeds per (prompt, background)")
    p.add_argument("--out", type=Path, default=Path("/tmp/toy-measure"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--lora", action="store_true", help="measure LoRA DreamBooth (LORA_VARIANTS) instead, with class drift")
    args = p.parse_args()
    torch.set_num_threads(1)
    from dbbatch.models.loading import load_base_model

    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DBBATCH_WORK_DIR": str(args.out / "work")}
    t0 = time.time()
    base = load_base_model("builtin:toy-sd", None, args.out / "work", None)
    if args.lora:
        out = run_dreambooth(args.out, args.seeds, env, lora=True)
        results = {s["id"]: {**subject_scores(base, out / s["id"] / "lora", list(range(args.sample_seeds))),
                             "class_drift": class_drift(base, out / s["id"] / "lora"),
                             "train_s": json.loads((out / s["id"] / "metrics.json").read_text())["seconds"]["train"]}
                   for s in lora_subjects(args.out / "photos", args.seeds)}
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    following = prompt_following(base)
    print("prompt following (48 held-out prompts):", following, flush=True)
    t1 = time.time()
    out = run_dreambooth(args.out, args.seeds, env, undertrained=True)
    t2 = time.time()
    results = dreambooth_results(out, args.seeds, list(range(args.sample_seeds)), args.out / "work")
    print(table(results))
    scores = evaluation_results(out, [rid for rid, _, _ in run_ids(args.seeds)] + [UNDERTRAINED["id"]])
    print(table(scores))
    record = {"prompt_following": following, "dreambooth": results, "evaluation": scores, "seeds": args.seeds,
              "sample_seeds": args.sample_seeds, "seconds": {"prompt_following": round(t1 - t0, 1),
                                                              "dreambooth_runs": round(t2 - t1, 1)}}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
