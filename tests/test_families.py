"""Model families (dbbatch/models/families/): SD 1.x/2.x and SDXL behind one interface.

- `dbbatch tiny-model --arch tiny-sdxl` writes an SDXL-shaped folder that StableDiffusionXLPipeline loads;
- for each family: image i is the same made alone or in a batch, and classifier-free guidance is one batched
  UNet forward per step (what the rendering through the family's diffusers pipeline must keep);
- the conditioning training uses is the one the family's pipeline computes at inference;
- an unsupported pipeline class is one line naming it and the supported ones;
- the priors cache key of SDXL carries the family and its micro-conditioning (SD keys are as before families).
The end-to-end, resume, S3 and LoRA tests run on both families through their parametrisation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY_ARCHS, run_cli, tiny_manifest

from dbbatch.config.settings import PriorConfig, SdxlSettings
from dbbatch.core.errors import ModelError


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from dbbatch.models.loading import load_base_model

    cache = tmp_path_factory.mktemp("family-cache")
    return {family: load_base_model(f"builtin:{arch}", None, cache, None) for family, arch in FAMILY_ARCHS.items()}


def test_tiny_sdxl_folder_is_sdxl_shaped_and_loads_with_the_sdxl_pipeline(family_model_dirs):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = family_model_dirs["sdxl"]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"  # as SDXL 1.0 ships them
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # native 64 px
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # built from fixed configs and a fixed seed: a second write is the same model
    again = folder.parent / "again"
    assert run_cli("tiny-model", "--arch", "tiny-sdxl", str(again)).returncode == 0
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (again / rel).read_bytes() == (folder / rel).read_bytes(), rel


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_an_image_is_the_same_alone_or_batched_and_guidance_is_one_forward(models, family: str):
    from dbbatch.models.sampling import generate

    model = models[family]
    shapes = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched = generate(model, ["a photo of dog", "a photo of cat", "a dog"], [5, 6, 7], 32, 3, 7.5, batch_size=3)
        assert shapes == [6, 6, 6], shapes  # 3 steps, each one forward of 3 conditional + 3 unconditional rows
        alone = generate(model, ["a dog"], [7], 32, 3, 7.5, batch_size=1)
        other_seed = generate(model, ["a dog"], [8], 32, 3, 7.5, batch_size=1)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(alone[0]), np.asarray(batched[2]))
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(batched[2]))  # the control: seeds matter


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_training_conditioning_is_what_the_pipeline_computes(models, family: str):
    model = models[family]
    pipe = model.pipeline()
    prompt = "a photo of sks dog"
    ours = model.encode([prompt])
    if family == "sd":
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        assert set(ours) == {"encoder_hidden_states"}
        assert torch.equal(ours["encoder_hidden_states"], embeds)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["text_embeds"], pooled)
        settings = SdxlSettings(original_size=(128, 96), crops_coords_top_left=(4, 8))
        time_ids = pipe._get_add_time_ids((128, 96), (4, 8), (32, 32), torch.float32,
                                          text_encoder_projection_dim=model.text_encoder_2.config.projection_dim)
        assert torch.equal(model.family.added_conditioning(settings, 32)["time_ids"], time_ids)
        default = model.family.added_conditioning(None, 32)["time_ids"]
        assert default.tolist() == [[32, 32, 0, 0, 32, 32]]
        # the UNet reads them: other sizes, another prediction
        latents, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        with torch.no_grad():
            a = model.family.predict(model.unet, latents, t, {**ours, "time_ids": time_ids})
            b = model.family.predict(model.unet, latents, t, {**ours, "time_ids": default})
        assert not torch.equal(a, b)
    other = model.encode(["a photo of a cat"])
    assert not torch.equal(other["encoder_hidden_states"], ours["encoder_hidden_states"])


def test_an_unsupported_pipeline_class_is_one_line_naming_it_and_the_supported_ones(tmp_path: Path, tiny_model_dir: Path):
    from dbbatch.models.loading import load_base_model

    folder = tmp_path / "sd3"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    expected = (f"base_model {str(folder)!r}: its pipeline class 'StableDiffusion3Pipeline' (model_index.json _class_name) "
                "is not supported; dbbatch trains StableDiffusionPipeline (Stable Diffusion 1.x/2.x), "
                "StableDiffusionXLPipeline (Stable Diffusion XL), FluxPipeline (FLUX.1)")
    with pytest.raises(ModelError) as caught:
        load_base_model(str(folder), None, tmp_path / "cache", None)
    assert str(caught.value) == expected
    m = tiny_manifest(tmp_path / "m.yaml", "out", [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "x/"}],
                      base_model=str(folder))
    proc = run_cli("validate", str(m))
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_priors_cache_key_carries_the_family_and_its_micro_conditioning(models):
    from dbbatch.batch.priors import model_prior_spec, prior_key, prior_spec

    priors = PriorConfig(num_images=2)
    sd = model_prior_spec(models["sd"], "a photo of dog", 64, priors, None)
    assert sd == prior_spec(models["sd"].identity, "a photo of dog", 64, priors)  # SD caches stay valid
    assert "family" not in sd
    sdxl = model_prior_spec(models["sdxl"], "a photo of dog", 64, priors, None)
    assert sdxl["family"] == "sdxl" and sdxl["original_size"] == [64, 64] and sdxl["crops_coords_top_left"] == [0, 0]
    same = model_prior_spec(models["sdxl"], "a photo of dog", 64, priors, SdxlSettings())
    bigger = model_prior_spec(models["sdxl"], "a photo of dog", 64, priors, SdxlSettings(original_size=(1024, 1024)))
    cropped = model_prior_spec(models["sdxl"], "a photo of dog", 64, priors, SdxlSettings(crops_coords_top_left=(0, 8)))
    assert prior_key(same) == prior_key(sdxl)  # unset sizes are the resolution: the same images
    assert len({prior_key(sdxl), prior_key(bigger), prior_key(cropped)}) == 3
    # not a key SDXL's text-encoder setting changes: it changes no class image
    assert prior_key(model_prior_spec(models["sdxl"], "a photo of dog", 64, priors,
                                      SdxlSettings(train_text_encoder_2=True))) == prior_key(sdxl)
