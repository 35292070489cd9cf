"""FLUX.1, the third family (issue 27), on builtin:tiny-flux (a FLUX.1-dev-shaped model: one double and one
single block, CLIP + T5, a guidance embedding) and its schnell twin. The family contract:

- `dbbatch tiny-model --arch tiny-flux` writes a folder FluxPipeline loads (T5 encoder and tokenizer made here);
- the conditioning training uses is what FluxPipeline computes (pooled CLIP, T5 sequence), the guidance value
  reaches a distilled transformer and no other, and the objective is flow matching on the drawn sigmas;
- the timestep schemes draw what they say (uniform, logit-normal, mode, the shift), per example's key;
- a run trains LoRA on the transformer and the CLIP encoder; the diffusers file, loaded with FluxPipeline's
  load_lora_weights, renders the stored samples; the kohya file is BFL's layout with fused projections whose
  product is exactly the adapters' (the negative control: a perturbed file is caught), and diffusers' own
  kohya-Flux converter renders what the diffusers file renders;
- SIGKILL mid-training, rerun: the adapters are bitwise the uninterrupted run's (another seed's are not);
- evaluation scores FluxPipeline renders during training, and the batch report lists the subjects;
- `base_dtype: bf16` trains float32 adapters beside a bf16 base, close to the float32 base's, with its own priors.
Packing on tiny-flux is in test_packing.py; Flux's hostile inputs are in test_hostile_inputs.py.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, draw_subject, render_stored_samples, run_cli, start_at_fault, tiny_manifest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dbbatch.config.settings import FluxSettings

GUIDANCE = 3.5  # the samples' (distilled) guidance
# kim's adapters stay inside the double blocks: diffusers' kohya-Flux converter splits a single block's fused
# linear1 by FLUX.1-dev's own widths (3072 x 3 + 12288), which tiny-flux's are not
DOUBLE_ONLY = ["transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
               "transformer_blocks.*.attn.to_out.0", "transformer_blocks.*.attn.add_k_proj", "transformer_blocks.*.ff.net.2"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-flux") / "tiny-flux"
    proc = run_cli("tiny-model", "--arch", "tiny-flux", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def model(flux_dir: Path):
    from dbbatch.models.loading import load_folder

    return load_folder(flux_dir, str(flux_dir))


def _manifest(tmp: Path, name: str, base: str, subjects: list[dict], **train) -> Path:
    for s in subjects:
        if not (tmp / "imgs" / s["id"]).exists():
            draw_subject(tmp / "imgs" / s["id"])  # 3 photos: kills land mid-epoch
    entries = [{"token": "sks", "class_noun": "dog", "images": f"imgs/{s['id']}/", **s} for s in subjects]
    return tiny_manifest(tmp / f"{name}.yaml", name, entries, base_model=base, defaults={
        "resolution": 32,
        "train": {"method": "lora", "max_steps": 8, "checkpoint_every": 4, "learning_rate": 1e-3,
                  "lora": {"rank": 4, "alpha": 8}, **train},
        "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
        "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0, 1], "steps": 3, "guidance_scale": GUIDANCE},
        "flux": {"weighting_scheme": "logit_normal", "timestep_shift": 3.0, "train_guidance": 1.0}})


REX = {"id": "rex", "train": {"lora": {"rank": 4, "alpha": 8, "text_encoder": True}},
       "evaluation": {"clip": "builtin:toy-clip", "every": 4, "seeds": [0]}}  # scored through FluxPipeline renders
KIM = {"id": "kim", "token": "ohwx", "class_noun": "cat", "priors": {"source": "base_model"},  # a higher rate: adapters
       "train": {"learning_rate": 2e-2, "lora": {"rank": 4, "alpha": 8, "target": DOUBLE_ONLY}}}  # that show in images


@pytest.fixture(scope="module")
def runs(tmp_path_factory, flux_dir: Path) -> dict:
    """One batch on the tiny-flux folder: rex with class images and adapters on the attention preset and the
    CLIP encoder; kim with priors from the base model and adapters in the double blocks."""
    tmp = tmp_path_factory.mktemp("flux-runs")
    m = _manifest(tmp, "both", str(flux_dir), [REX, KIM])
    proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp / "work")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "out": tmp / "both", "log": proc.stderr, "base": flux_dir}


def _pipeline(folder: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder))


def test_tiny_flux_folder_is_flux_shaped_and_loads_with_flux_pipeline(flux_dir: Path, tmp_path: Path):
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

    assert json.loads((flux_dir / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    pipe = _pipeline(flux_dir)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is T5EncoderModel
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast) and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.transformer.config.guidance_embeds and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    schnell = tmp_path / "schnell"
    assert run_cli("tiny-model", "--arch", "tiny-flux-schnell", str(schnell)).returncode == 0
    assert not json.loads((schnell / "transformer" / "config.json").read_text())["guidance_embeds"]
    # the same seed, the same weights; only the guidance embedding is missing
    a, b = load_file(str(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")), \
        load_file(str(schnell / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(a) - set(b) and all(k.startswith("time_text_embed.guidance_embedder") for k in set(a) - set(b))


def test_conditioning_is_the_pipelines_and_guidance_reaches_a_distilled_transformer_only(model):
    pipe = model.pipeline()
    ours = model.encode(["a photo of sks dog"])
    embeds, pooled, _ = pipe.encode_prompt("a photo of sks dog", prompt_2=None, device="cpu", max_sequence_length=512)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    assert not torch.equal(model.encode(["a photo of a cat"])["pooled_projections"], pooled)
    from dbbatch.batch.priors import model_prior_spec
    from dbbatch.config.settings import PriorConfig

    spec = model_prior_spec(model, "a photo of dog", 32, PriorConfig(), None)  # the priors cache key's inputs
    assert (spec["family"], spec["sampler"], spec["true_cfg_scale"]) == ("flux", "flow-match-euler", 1.0)
    latents, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    fam = model.family
    with torch.no_grad():
        at = {g: fam.predict(model.transformer, latents, t, {**ours, **fam.added_conditioning(FluxSettings(train_guidance=g), 32)})
              for g in (1.0, 4.0)}
    assert at[1.0].shape == latents.shape and not torch.equal(at[1.0], at[4.0])
    from dbbatch.models.builtin import build_builtin

    schnell = build_builtin("tiny-flux-schnell")["transformer"]  # no guidance embedding: the value is not passed
    with torch.no_grad():
        plain = [fam.predict(schnell, latents, t, {**ours, **fam.added_conditioning(FluxSettings(train_guidance=g), 32)})
                 for g in (1.0, 4.0)]
    assert plain[0].shape == latents.shape and torch.equal(plain[0], plain[1])


def test_flow_matching_objective_and_timestep_schemes(model):
    from dbbatch.train.data import draws, noised_examples

    fam, sched = model.family, model.family.training_scheduler(model.scheduler_config)
    keys = list(range(0, 2000, 2))

    def sigmas(**kw) -> torch.Tensor:
        s = FluxSettings(**kw)
        return draws(keys, (1,), lambda g: fam.draw_timestep(g, sched, s))[2] / 1000

    uniform, logit, mode, shifted = sigmas(), sigmas(weighting_scheme="logit_normal"), \
        sigmas(weighting_scheme="mode", mode_scale=1.29), sigmas(timestep_shift=3.0)
    assert torch.equal(uniform, sigmas()) and not torch.equal(uniform, logit)  # a pure function of the keys
    assert 0 < uniform.min() and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.04
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean().item()  # noqa: E731
    assert middle(logit) > middle(uniform) + 0.1  # logit-normal favours the middle steps
    assert middle(mode) > middle(uniform) + 0.1  # so does mode with scale 1.29 (SD3's; 0 would be uniform)
    assert torch.allclose(shifted, 3 * uniform / (1 + 2 * uniform))  # the shift, on the same draws
    # x_t = (1 - sigma) x + sigma noise, target noise - x; the latents shifted then scaled as the VAE says
    mean, std = torch.randn(2, 4, 4, 4), torch.full((2, 4, 4, 4), 0.1)
    noisy, target, t = noised_examples(fam, sched, mean, std, [10, 12], 0.3611, "cpu", 0.1159, None)
    sample, noise, t2 = draws([10, 12], (4, 4, 4), lambda g: fam.draw_timestep(g, sched, None))
    x = (mean + std * sample - 0.1159) * 0.3611
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.equal(t, t2) and torch.allclose(noisy, (1 - s) * x + s * noise) and torch.allclose(target, noise - x)


def test_lora_trains_transformer_and_clip_and_the_diffusers_file_reproduces_the_samples(runs):
    out = runs["out"]
    with safe_open(str(out / "rex" / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in keys)
    assert any(".attn.add_q_proj." in k for k in keys)  # the attention preset covers the joint (text) stream
    assert any(k.startswith("text_encoder.") for k in keys) and not any(k.startswith("text_encoder_2.") for k in keys)
    metrics = json.loads((out / "rex" / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] == 8 and metrics["priors_generated"] == 2
    points = metrics["evaluation"]["points"]
    assert [p["step"] for p in points] == [4, 8] and all(isinstance(p["clip_i"], float) for p in points)
    report = json.loads((out / "_report" / "summary.json").read_text())
    assert {s["id"] for s in report["subjects"]} == {"rex", "kim"}
    assert json.loads((out / "kim" / "metrics.json").read_text())["priors_generated"] == 0  # priors.source base_model
    pipe = _pipeline(runs["base"])
    plain, stored = render_stored_samples(pipe, out / "rex", steps=3, guidance_scale=GUIDANCE)
    assert any(not np.array_equal(a, b) for a, b in zip(plain, stored)), "the base model alone makes the same images"
    pipe.load_lora_weights(str(out / "rex" / "lora"), weight_name="pytorch_lora_weights.safetensors")
    made, stored = render_stored_samples(pipe, out / "rex", steps=3, guidance_scale=GUIDANCE)
    assert all(np.array_equal(a, b) for a, b in zip(made, stored)), "the diffusers file does not reproduce the samples"
    card = (out / "rex" / "lora" / "README.md").read_text()
    assert "from diffusers import FluxPipeline" in card and "max_sequence_length=512" in card


def _deltas(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change, scale x B @ A, from diffusers/peft keys (`transformer.<layer>.lora_A`)."""
    return {k[len("transformer."):-len(".lora_A.weight")]: scale * (state[k.replace("lora_A", "lora_B")] @ state[k])
            for k in state if k.endswith(".lora_A.weight") and k.startswith("transformer.")}


def test_kohya_file_is_bfl_layout_whose_fused_products_are_the_adapters(runs, model):
    from dbbatch.models.families.flux_kohya import bfl_groups

    lora = runs["out"] / "rex" / "lora"
    kohya = load_file(str(lora / "rex.safetensors"))
    layers = {k.split(".", 1)[0] for k in kohya}
    assert all(re.fullmatch(r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_[02]|mod_lin)|"
                            r"single_blocks_\d+_(linear[12]|modulation_lin))|lora_te1_text_model_encoder_layers_\d+_.+", n)
               for n in layers), sorted(layers)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in layers and "lora_unet_single_blocks_0_linear1" in layers
    widths = {n: m.out_features for n, m in model.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = bfl_groups(list(widths))
    ours = _deltas(load_file(str(lora / "pytorch_lora_weights.safetensors")), 8 / 4)

    def check(k: dict[str, torch.Tensor]) -> float:
        worst = 0.0
        for name, parts in groups.items():
            if f"{name}.lora_down.weight" not in k:
                continue
            down, up = k[f"{name}.lora_down.weight"], k[f"{name}.lora_up.weight"]
            fused = float(k[f"{name}.alpha"]) / down.shape[0] * (up @ down)
            want = torch.cat([ours.get(p, torch.zeros(widths[p], down.shape[1])) for p in parts])
            worst = max(worst, (fused - want).abs().max().item())
        return worst

    assert check(kohya) < 1e-6  # linear1 = to_q, to_k, to_v and (no adapter: zero rows) proj_mlp
    tampered = dict(kohya)
    key = "lora_unet_single_blocks_0_linear1.lora_up.weight"
    tampered[key] = tampered[key].clone()
    tampered[key][-1, 0] += 0.05  # a row of proj_mlp, which has no adapter
    assert check(tampered) > 1e-3, "the check misses a change in a fused layer"


def test_kohya_file_through_diffusers_converter_renders_what_the_diffusers_file_renders(runs, tmp_path: Path):
    out = runs["out"] / "kim"
    pipe = _pipeline(runs["base"])
    pipe.load_lora_weights(str(out / "lora"), weight_name="kim.safetensors")  # diffusers' kohya-Flux converter
    made, stored = render_stored_samples(pipe, out, steps=3, guidance_scale=GUIDANCE)
    assert all(np.array_equal(a, b) for a, b in zip(made, stored))
    plain, _ = render_stored_samples(_pipeline(runs["base"]), out, steps=3, guidance_scale=GUIDANCE)
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(plain, stored)) > 8  # the adapters show
    bad = load_file(str(out / "lora" / "kim.safetensors"))
    up = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"  # the q/k/v blocks swapped around: a wrong fusion
    bad[up] = torch.cat(list(bad[up].chunk(3))[::-1])
    save_file(bad, str(tmp_path / "bad.safetensors"))
    pipe = _pipeline(runs["base"])
    pipe.load_lora_weights(str(tmp_path), weight_name="bad.safetensors")
    made, _ = render_stored_samples(pipe, out, steps=3, guidance_scale=GUIDANCE)
    assert any(not np.array_equal(a, b) for a, b in zip(made, stored)), "a perturbed file passes"


def test_sigkill_then_rerun_is_bitwise_the_uninterrupted_adapters(runs, tmp_path: Path):
    m = _manifest(tmp_path, "killed", str(runs["base"]), [REX])
    proc, _ = start_at_fault(m, tmp_path / "pod1", "pause_at_step=6")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (tmp_path / "killed" / "rex" / "checkpoints").glob("*.ckpt")) == ["step-0000004.ckpt"]
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0 and "resuming from" in rerun.stderr, rerun.stderr[-3000:]
    ref = load_file(str(runs["out"] / "rex" / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(tmp_path / "killed" / "rex" / "lora" / "pytorch_lora_weights.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # the negative control: a step's randomness from another seed gives other adapters
    other = _manifest(tmp_path, "seed1", str(runs["base"]), [{**REX, "train": {**REX["train"], "seed": 1}}])
    assert run_cli("run", str(other), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2"))).returncode == 0
    diff = load_file(str(tmp_path / "seed1" / "rex" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)


def test_a_bf16_base_trains_float32_adapters_close_to_the_fp32_ones_and_caches_its_own_priors(runs, tmp_path: Path):
    import yaml

    m = _manifest(tmp_path, "bf16", str(runs["base"]), [REX])
    doc = yaml.safe_load(m.read_text())
    doc.update(base_dtype="bf16", prior_cache=str(runs["out"] / "_priors"))  # the fp32 run's class images are there
    m.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rex generating 2 of 2 class images" in proc.stderr  # a bf16 base's priors are its own, not the fp32 ones
    ours = load_file(str(tmp_path / "bf16" / "rex" / "lora" / "pytorch_lora_weights.safetensors"))
    ref = load_file(str(runs["out"] / "rex" / "lora" / "pytorch_lora_weights.safetensors"))
    assert ours.keys() == ref.keys() and all(v.dtype == torch.float32 for v in ours.values())
    # bf16 rounding (and its own class images) move the trained up-projections a little (~9% here), not to other
    # ones: another seed's are as far as two random matrices (~140%)
    ups = sorted(k for k in ref if ".lora_B." in k)
    a, b = torch.cat([ours[k].flatten() for k in ups]), torch.cat([ref[k].flatten() for k in ups])
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.25
    config = yaml.safe_load((tmp_path / "bf16" / "rex" / "config.yaml").read_text())
    assert config["base_dtype"] == "bf16"
