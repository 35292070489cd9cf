"""The family interface (pure declarations plus what every UNet family shares)."""

from __future__ import annotations

from typing import Any, Optional


class Family:
    """What a model family implements. Attributes are plain data; methods take modules, never the manifest.

    A new family (SD3, Flux) sets the attributes and implements: `load`, `build`, `pipeline`, `encode`,
    `added_conditioning`, `predict`, `noised`, `render_options`, `trained_text_encoders` and `kohya_version`.
    `settings` below is the subject's family section (`sdxl:` for SDXL; None when the family has none or the
    subject left it out)."""

    name: str  # short name: metrics, the priors cache spec, the README table ("sd", "sdxl")
    title: str  # what users call it ("Stable Diffusion 1.x/2.x")
    pipeline_class: str  # model_index.json `_class_name` of its diffusers folders
    text_encoders: tuple[str, ...]  # component names, in the order `encode` takes them
    tokenizers: tuple[str, ...]  # one per text encoder
    section: Optional[str] = None  # the manifest section of this family's own keys ("sdxl"), or None
    # kohya key prefix of each text encoder's LoRA layers (A1111/ComfyUI); the UNet's is lora_unet_
    kohya_text_prefixes: dict[str, str] = {}

    def settings_of(self, subject: Any) -> Any:
        """The subject's section of this family's keys (None: the family has none, or it was left out)."""
        return getattr(subject, self.section, None) if self.section else None

    @property
    def components(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family must have."""
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    # -- loading and writing ---------------------------------------------------------------------------------
    def load(self, folder: Any) -> dict[str, Any]:
        """The components of a diffusers folder (fp32 on the CPU): {component name: module or tokenizer}."""
        raise NotImplementedError

    def build(self, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        """A built-in architecture's components with weights from `seed` (in memory)."""
        raise NotImplementedError

    def pipeline(self, parts: dict[str, Any], scheduler: Any) -> Any:
        """The family's diffusers pipeline over these very modules (no copies): renders, saves, loads LoRA."""
        raise NotImplementedError

    # -- conditioning ----------------------------------------------------------------------------------------
    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list[Any]:
        """Token ids per tokenizer, padded to its length, as the family's pipeline tokenizes."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]

    def encode(self, encoders: list[Any], ids: list[Any]) -> dict[str, Any]:
        """Token ids -> the prompt's conditioning, {name: tensor with the prompts on dim 0}, exactly as the
        family's pipeline computes it (tests/test_families.py holds them equal)."""
        raise NotImplementedError

    def added_conditioning(self, settings: Any, resolution: int) -> dict[str, Any]:
        """Conditioning that is not the prompt (SDXL's size and crop ids), one row, or {}."""
        return {}

    def conditioning_spec(self, settings: Any, resolution: int) -> dict[str, Any]:
        """What changes a rendered image beyond the prompt and sampler, for the priors cache key and the
        checkpoint fingerprint ({} for SD 1.x/2.x, whose keys stay as they were before families)."""
        return {}

    def fingerprint(self, settings: Any, resolution: int) -> dict[str, Any]:
        """The family's resolved settings a checkpoint or stored model must match ({} for SD 1.x/2.x)."""
        return self.conditioning_spec(settings, resolution)

    # -- training --------------------------------------------------------------------------------------------
    def predict(self, unet: Any, noisy: Any, timesteps: Any, cond: dict[str, Any]) -> Any:
        """The denoiser's output for noisy latents under `cond` (every tensor of it has the batch's rows)."""
        dtype = unet.dtype
        added = {k: v.to(dtype) for k, v in cond.items() if k != "encoder_hidden_states"}
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    added_cond_kwargs=added or None).sample

    def noised(self, scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> tuple[Any, Any]:
        """The training objective: (noisy input, target) of clean latents at timesteps (uniform over the
        scheduler's training steps). DDPM: epsilon or v-prediction, as the scheduler config says."""
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def trained_text_encoders(self, settings: Any) -> tuple[str, ...]:
        """The text encoders that train when a subject trains its text encoder (full or LoRA)."""
        return self.text_encoders[:1]

    # -- rendering and export --------------------------------------------------------------------------------
    def render_options(self, settings: Any, resolution: int, negative_prompt: str) -> dict[str, Any]:
        """Keyword arguments of the pipeline call beyond prompt, size, steps, guidance and generators."""
        return {"negative_prompt": negative_prompt}

    def kohya_version(self, model: Any) -> Optional[tuple[str, str]]:
        """(kohya `ss_base_model_version`, `modelspec.architecture`) when the model is a known release."""
        return None
