"""FLUX.1 (dev and schnell): a transformer denoiser on 2x2-packed latent patches with position ids, conditioned
on the pooled output of a CLIP text encoder and the sequence of a T5 encoder, trained by flow matching
(x_t = (1 - sigma) x + sigma noise, target noise - x). FLUX.1-dev is guidance-distilled: its transformer takes
the guidance value as an embedding (`guidance_embeds`); schnell's does not.

Timesteps are drawn as diffusers' Flux trainers draw them (`compute_density_for_timestep_sampling`: uniform,
logit-normal or mode), one per example from that example's own generator, on the training scheduler's sigma
grid, optionally shifted (`flux.timestep_shift`); the losses of these schemes are unweighted
(`compute_loss_weighting_for_sd3` returns ones for them), so none is applied.
"""

from __future__ import annotations

from typing import Any, Optional

from dbbatch.models.families.base import Family, vae_scale_factor
from dbbatch.models.families.sd import _device, clip_text_config

T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length default: training pads the T5 prompt as rendering does


def _settings(settings: Any) -> Any:
    from dbbatch.config.settings import FluxSettings

    return settings if settings is not None else FluxSettings()


def pack(latents: Any) -> Any:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, in FluxPipeline's order."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Any, shape: tuple[int, ...]) -> Any:
    """The inverse of `pack` for latents of `shape`."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """The (row, column) position ids of the packed patches (FluxPipeline's latent image ids)."""
    import torch

    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class Flux(Family):
    name = "flux"
    title = "FLUX.1"
    pipeline_class = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP (pooled), T5 (sequence)
    tokenizers = ("tokenizer", "tokenizer_2")
    section = "flux"
    denoiser = "transformer"
    latent_patch = 2
    full_fine_tune = ("FLUX.1's transformer has 12B parameters: a full fine-tune per subject needs about 190 GB for its "
                      "weights, gradients and AdamW state and writes a 24 GB model; train LoRA adapters instead "
                      "(train.method: lora)")
    kohya_text_prefixes = {"text_encoder": "lora_te1_"}

    def load(self, folder: Any) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return {"tokenizer": CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                "tokenizer_2": T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2")),
                "text_encoder": CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32),
                "text_encoder_2": T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), dtype=torch.float32),
                "vae": AutoencoderKL.from_pretrained(str(folder / "vae")),
                "transformer": FluxTransformer2DModel.from_pretrained(str(folder / "transformer"))}

    def build(self, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        from dbbatch.models.assets import load_shipped_tokenizer

        tokenizer, tokenizer_2 = load_shipped_tokenizer("tokenizer"), load_shipped_tokenizer("tokenizer_t5")
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**arch["transformer"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, arch["text_encoder"]))
        t5 = T5Config(vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id,
                      eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
                      is_encoder_decoder=False, use_cache=False, **arch["text_encoder_2"])
        return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=T5EncoderModel(t5),
                    tokenizer=tokenizer, tokenizer_2=tokenizer_2)

    def pipeline(self, parts: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler, vae=parts["vae"], text_encoder=parts["text_encoder"],
                            tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_2"],
                            tokenizer_2=parts["tokenizer_2"], transformer=parts["transformer"])

    def native_resolution(self, denoiser_config: Any, vae_config: Any) -> int:
        # FluxPipeline's default size is 128 latent pixels; the VAE's own sample_size where it says one
        size = vae_config["sample_size"] if isinstance(vae_config, dict) else getattr(vae_config, "sample_size", None)
        return int(size) if size else 128 * vae_scale_factor(vae_config)

    def denoiser_from_config(self, config: dict[str, Any]) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(config)

    def training_scheduler(self, config: dict[str, Any]) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def sampling_scheduler(self, config: dict[str, Any]) -> Any:
        return self.training_scheduler(config)  # FluxPipeline's Euler sampler, deterministic

    # -- conditioning ----------------------------------------------------------------------------------------
    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list[Any]:
        clip, t5 = tokenizers
        return [clip(prompts, padding="max_length", max_length=clip.model_max_length, truncation=True,
                     return_tensors="pt").input_ids,
                t5(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids]

    def encode(self, encoders: list[Any], ids: list[Any]) -> dict[str, Any]:
        (clip, t5), (clip_ids, t5_ids) = encoders, ids
        pooled = clip(clip_ids.to(_device(clip)), output_hidden_states=False).pooler_output
        sequence = t5(t5_ids.to(_device(t5)), output_hidden_states=False)[0]
        return {"encoder_hidden_states": sequence, "pooled_projections": pooled}

    def added_conditioning(self, settings: Any, resolution: int) -> dict[str, Any]:
        import torch

        return {"guidance": torch.tensor([[_settings(settings).train_guidance]], dtype=torch.float32)}

    def conditioning_spec(self, settings: Any, resolution: int) -> dict[str, Any]:
        # the priors spec names FluxPipeline's sampler (its default says the UNet families' DDIM)
        return {"family": self.name, "sampler": "flow-match-euler", "true_cfg_scale": _settings(settings).true_cfg_scale}

    def fingerprint(self, settings: Any, resolution: int) -> dict[str, Any]:
        return {"family": self.name, **_settings(settings).model_dump(mode="json")}

    # -- training --------------------------------------------------------------------------------------------
    def predict(self, transformer: Any, noisy: Any, timesteps: Any, cond: dict[str, Any]) -> Any:
        import torch

        dtype, (b, _, h, w) = transformer.dtype, noisy.shape
        text = cond["encoder_hidden_states"]
        guidance = cond.get("guidance") if transformer.config.guidance_embeds else None
        out = transformer(
            hidden_states=pack(noisy).to(dtype), timestep=(timesteps / 1000).to(dtype),
            guidance=guidance.reshape(b).to(dtype) if guidance is not None else None,
            pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=text.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(h // 2, w // 2, noisy.device, dtype), return_dict=False)[0]
        return unpack(out, noisy.shape)

    def draw_timestep(self, generator: Any, scheduler: Any, settings: Any) -> Any:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        s = _settings(settings)
        n = scheduler.config.num_train_timesteps
        u = compute_density_for_timestep_sampling(s.weighting_scheme, 1, logit_mean=s.logit_mean, logit_std=s.logit_std,
                                                  mode_scale=s.mode_scale, generator=generator)
        index = (u * n).long().clamp(0, n - 1)
        sigma = scheduler.sigmas[index].float()  # the scheduler's training grid, as diffusers' script reads it
        if s.timestep_shift != 1.0:
            sigma = s.timestep_shift * sigma / (1 + (s.timestep_shift - 1) * sigma)
        return sigma * n

    def noised(self, scheduler: Any, latents: Any, noise: Any, timesteps: Any, settings: Any = None) -> tuple[Any, Any]:
        sigma = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1))
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def setting_problems(self, settings: Any, where: str, denoiser_config: dict[str, Any], source: str) -> list[str]:
        if settings is None or "train_guidance" not in settings.model_fields_set:
            return []
        if not denoiser_config.get("guidance_embeds", False):
            return [f"{where}.train_guidance: {source} is not guidance-distilled (its transformer has no guidance "
                    "embedding, as FLUX.1-schnell); remove flux.train_guidance"]
        return []

    def trained_text_encoders(self, settings: Any) -> tuple[str, ...]:
        return ("text_encoder",)  # the CLIP encoder; T5 (4.7B parameters) stays frozen, as hosted trainers keep it

    # -- rendering and export --------------------------------------------------------------------------------
    def render_options(self, settings: Any, resolution: int, negative_prompt: str) -> dict[str, Any]:
        s = _settings(settings)
        # a negative prompt takes effect through true CFG only (two forwards a step); without it, none is passed
        negative = negative_prompt if negative_prompt and s.true_cfg_scale > 1 else None
        return {"negative_prompt": negative, "true_cfg_scale": s.true_cfg_scale, "max_sequence_length": T5_MAX_LENGTH}

    def kohya_state(self, denoiser: Any, denoiser_state: dict[str, Any], text_states: dict[str, dict[str, Any]],
                    alpha: float) -> dict[str, Any]:
        """BFL's module names with fused projections (flux_kohya.py); the CLIP encoder's adapters as lora_te1_."""
        import torch

        from dbbatch.models.families.flux_kohya import kohya_flux_state
        from dbbatch.models.lora_export import kohya_state

        # the base layers' widths (under peft, an adapted Linear is `<name>.base_layer`; its lora_A/B are skipped)
        widths = {n.removesuffix(".base_layer"): m.out_features for n, m in denoiser.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".lora_" not in n}
        return {**kohya_flux_state(denoiser_state, widths, alpha),
                **(kohya_state({}, text_states, alpha, self.kohya_text_prefixes) if text_states else {})}

    def kohya_version(self, model: Any) -> Optional[tuple[str, str]]:
        cfg = model.transformer.config
        if cfg.num_layers == 19 and cfg.num_single_layers == 38:
            return ("flux1", "flux-1-dev/lora" if cfg.guidance_embeds else "flux-1-schnell/lora")
        return None
