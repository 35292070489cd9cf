"""Training learns: DreamBooth on a saturated-red-square subject moves what the token prompt samples toward
the subject, and prior preservation keeps the class prompt nearer the class priors' look than training
without it. Several training seeds, one `dbbatch run` for all of them.

Measured in latent space, through the base model's own VAE (its weights are random, so pixels say little):
- the subject's look is the mean latent of its images; the class's look is the mean latent of the class-prior
  images dbbatch generated (what prior preservation trains the class prompt toward);
- a prompt's samples are summarised by the mean final latent over several sampling seeds, and placed on the
  line from the class look (0) to the subject look (1) by projection.

What does NOT hold on this tiny random model, and is therefore not asserted: the token prompt and the class
prompt being told apart. Its CLIP encoder (width 32) gives "a photo of dog" and "a photo of sks dog" outputs
that differ by ~10% of their size at the few positions after the token and not at all before it, and the UNet's
cross-attention averages that over 77 positions: in every run both prompts sample the same latents (positions
equal to 3 decimals). So prior preservation shows here as a mixture (both prompts end about halfway between the
class look and the subject's look) rather than as a class prompt that stays put while the token moves.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from conftest import draw_subject, run_cli, tiny_manifest

RES = 32
TRAIN_SEEDS = (0, 1, 2)
SAMPLE_SEEDS = list(range(8))
SAMPLE_STEPS = 10
GUIDANCE = 7.5
TOKEN_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


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


def calibrated_tiny_model(out_dir: Path, calibration_images: list[Image.Image], cache_dir: Path) -> Path:
    """builtin:tiny-sd with a VAE calibrated the way a real Stable Diffusion VAE is, saved as a diffusers folder.

    The random VAE's posterior std is ~1.03 while its latent means have an rms of ~0.3: every training latent
    (mean + std * noise) would be mostly noise, and a subject's look would be a tiny signal in it. And its
    scaling factor (0.18215, SD's) leaves latents ~20x smaller than the unit variance the noise schedule
    assumes. A trained SD VAE has a near-deterministic posterior and a scaling factor that makes latents unit
    variance; this gives the tiny VAE those two properties. Encoder and decoder weights stay random, and the
    UNet and text encoder are the built-in ones."""
    from diffusers import DDIMScheduler

    from dbbatch.images import to_tensor
    from dbbatch.models import load_base_model, save_folder
    from dbbatch.training import latent_stats

    base = load_base_model("builtin:tiny-sd", None, cache_dir, None)
    vae = base.vae
    with torch.no_grad():
        # quant_conv's output is (mean, logvar) x 4 channels; logvar -20 -> std 4.5e-5.
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20.0
    means, _ = latent_stats(vae, to_tensor(calibration_images))
    vae.register_to_config(scaling_factor=1.0 / means.std().item())
    comps = dict(unet=base.unet, vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                 scheduler=DDIMScheduler.from_config(base.scheduler_config))
    return save_folder(comps, out_dir)


def mean_latent(model, files: list[Path]) -> torch.Tensor:
    from dbbatch.images import to_tensor
    from dbbatch.training import latent_stats

    pixels = to_tensor([Image.open(f).convert("RGB").resize((RES, RES)) for f in files])
    means, _ = latent_stats(model.vae, pixels)
    return (means * model.vae.config.scaling_factor).mean(0)


def sampled(model, prompt: str) -> torch.Tensor:
    """Mean final latent of `prompt` over the sampling seeds."""
    from dbbatch.sampling import generate

    latents = generate(model, [prompt] * len(SAMPLE_SEEDS), SAMPLE_SEEDS, RES, SAMPLE_STEPS, GUIDANCE,
                       batch_size=len(SAMPLE_SEEDS), output="latent")
    return torch.stack(latents).mean(0)


def test_training_moves_token_toward_subject_and_prior_preservation_holds_class(tmp_path: Path, work_env):
    from diffusers import UNet2DConditionModel

    from dbbatch.models import load_base_model

    subject_dir = draw_subject(tmp_path / "subject")  # a (220, 30, 30) square on light backgrounds
    subject_files = sorted(subject_dir.glob("*.png"))
    base_dir = calibrated_tiny_model(tmp_path / "base", [Image.open(f).convert("RGB").resize((RES, RES)) for f in subject_files],
                                     tmp_path / "cache")

    runs = [(seed, prior) for seed in TRAIN_SEEDS for prior in (True, False)]
    subjects = [{
        "id": f"seed{seed}-{'prior' if prior else 'noprior'}", "token": "sks", "class_noun": "dog", "images": str(subject_dir),
        "train": {"seed": seed, "with_prior_preservation": prior},
    } for seed, prior in runs]
    manifest = tiny_manifest(tmp_path / "learn.yaml", str(tmp_path / "out"), subjects, base_model=str(base_dir), defaults={
        "resolution": RES,
        "train": {"max_steps": 100, "learning_rate": 1e-3, "checkpoint_every": 1000},
        "priors": {"num_images": 4, "steps": SAMPLE_STEPS, "guidance_scale": GUIDANCE, "batch_size": 4},
        "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 1, "include_class_prompt": False},
    })
    proc = run_cli("run", str(manifest), env=work_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with one_thread():
        model = load_base_model(str(base_dir), None, tmp_path / "cache", None)
        prior_files = sorted((tmp_path / "out" / "_priors").glob("*/*.png"))
        assert len(prior_files) == 4, prior_files
        z_subject, z_class = mean_latent(model, subject_files), mean_latent(model, prior_files)
        line = z_subject - z_class

        def position(z: torch.Tensor) -> float:  # 0: the class priors' look, 1: the subject's look
            return float(((z - z_class) * line).sum() / (line * line).sum())

        def distance(z: torch.Tensor) -> float:  # mean squared distance to the subject's look
            return float((z - z_subject).pow(2).mean())

        base_token = sampled(model, TOKEN_PROMPT)
        results = {}
        for (seed, prior), subject in zip(runs, subjects):
            unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / subject["id"] / "model" / "unet"))
            model.unet.load_state_dict(unet.state_dict())
            token, klass = sampled(model, TOKEN_PROMPT), sampled(model, CLASS_PROMPT)
            model.restore()
            results[seed, prior] = dict(token_distance=distance(token) / distance(base_token),
                                        token_position=position(token), class_position=position(klass))
    report = "\n".join(f"seed {s} prior={p}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) for (s, p), r in results.items())
    print(report)  # the measured numbers, shown with -s

    for (seed, prior), r in results.items():
        # The base model's samples are far from anything the VAE makes; after training they sit at the
        # subject's look (0.07-0.11 of the base distance, training seeds 0-5).
        assert r["token_distance"] < 0.25, f"seed {seed} prior={prior}: token samples did not move to the subject\n{report}"
    for seed in TRAIN_SEEDS:
        # Without prior preservation the token samples end nearer the subject than the class look (0.65-0.79
        # measured over training seeds 0-5): it is the subject they moved to, not merely somewhere an image can be.
        assert results[seed, False]["token_position"] > 0.55, f"seed {seed}: token samples not nearer the subject than the class look\n{report}"
    # Prior preservation holds the class prompt back: measured over training seeds 0-5, 0.49-0.60 with it
    # against 0.65-0.79 without, 0.06-0.29 less in every seed pair (0.23 on average for seeds 0-2). With
    # prior_loss_weight 0 (the prior batch still drawn, so the random stream differs) the pairs differed
    # by -0.005, 0.14, -0.01: these assertions then fail.
    held_back = {seed: results[seed, False]["class_position"] - results[seed, True]["class_position"] for seed in TRAIN_SEEDS}
    assert min(held_back.values()) > 0.03, f"class prompt drifted as far with prior preservation as without: {held_back}\n{report}"
    assert sum(held_back.values()) / len(held_back) > 0.08, f"prior preservation barely held the class prompt back: {held_back}\n{report}"
