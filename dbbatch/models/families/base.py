"""The family interface (pure declarations plus what every UNet family shares)."""

from __future__ import annotations

from typing import Any, Optional


def vae_scale_factor(vae_config: Any) -> int:
    """Pixels per latent pixel: the VAE halves the size in every block but the last (as diffusers computes it).
    Takes the config (a dict from vae/config.json, or a loaded VAE's config): no weights needed."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


class Family:
    """What a model family implements. Attributes are plain data; methods take modules, never the manifest.

    A new family sets the attributes and implements: `load`, `build`, `pipeline`, `encode`,
    `added_conditioning`, `predict`, `noised`, `render_options`, `trained_text_encoders` and `kohya_version`;
    one whose denoiser is not a UNet (FLUX.1's transformer) also names it (`denoiser`) and says how its
    timesteps are drawn (`draw_timestep`), which schedulers train and sample, and its native size.
    `settings` below is the subject's family section (`sdxl:`, `flux:`; None when the family has none or the
    subject left it out)."""

    name: str  # short name: metrics, the priors cache spec, the README table ("sd", "sdxl")
    title: str  # what users call it ("Stable Diffusion 1.x/2.x")
    pipeline_class: str  # model_index.json `_class_name` of its diffusers folders
    text_encoders: tuple[str, ...]  # component names, in the order `encode` takes them
    tokenizers: tuple[str, ...]  # one per text encoder
    section: Optional[str] = None  # the manifest section of this family's own keys ("sdxl"), or None
    denoiser: str = "unet"  # the denoiser's component name in the diffusers folder and pipeline
    latent_patch: int = 1  # the denoiser reads latents in patches of this side (FLUX.1 packs 2x2)
    full_fine_tune: Optional[str] = None  # why `train.method: full` is refused for this family, or None
    # kohya key prefix of each text encoder's LoRA layers (A1111/ComfyUI); the UNet's is lora_unet_
    kohya_text_prefixes: dict[str, str] = {}

    def settings_of(self, subject: Any) -> Any:
        """The subject's section of this family's keys (None: the family has none, or it was left out)."""
        return getattr(subject, self.section, None) if self.section else None

    @property
    def components(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family must have."""
        return (self.denoiser, "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    def native_resolution(self, denoiser_config: Any, vae_config: Any) -> int:
        """The pixel size the model was trained at (what `resolution` defaults to), from the configs (dicts or
        loaded models' configs): the UNet's sample size in latent pixels."""
        size = denoiser_config.get("sample_size", 64) if isinstance(denoiser_config, dict) else denoiser_config.sample_size
        return int(size) * vae_scale_factor(vae_config)

    def denoiser_from_config(self, config: dict[str, Any]) -> Any:
        """The denoiser built from its config alone (call under accelerate's init_empty_weights: no weights)."""
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)

    def training_scheduler(self, config: dict[str, Any]) -> Any:
        """The scheduler whose noise schedule training uses (DDPM over the folder's betas)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config)

    def sampling_scheduler(self, config: dict[str, Any]) -> Any:
        """The scheduler priors, samples and evaluation render with (DDIM, eta 0: deterministic)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(config)

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

    def draw_timestep(self, generator: Any, scheduler: Any, settings: Any) -> Any:
        """One example's timestep (a 1-element tensor) from its own generator (train/data.py `draws`): uniform
        over the scheduler's training steps."""
        import torch

        return torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)

    def noised(self, scheduler: Any, latents: Any, noise: Any, timesteps: Any, settings: Any = None) -> tuple[Any, Any]:
        """The training objective: (noisy input, target) of clean latents at timesteps (`draw_timestep`).
        DDPM: epsilon or v-prediction, as the scheduler config says."""
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def setting_problems(self, settings: Any, where: str, denoiser_config: dict[str, Any], source: str) -> list[str]:
        """The family section's settings that this very model cannot use (its denoiser's config tells), one line
        each starting with `where` (e.g. "subjects[0].flux")."""
        return []

    def trained_text_encoders(self, settings: Any) -> tuple[str, ...]:
        """The text encoders that train when a subject trains its text encoder (full or LoRA)."""
        return self.text_encoders[:1]

    # -- rendering and export --------------------------------------------------------------------------------
    def render_options(self, settings: Any, resolution: int, negative_prompt: str) -> dict[str, Any]:
        """Keyword arguments of the pipeline call beyond prompt, size, steps, guidance and generators."""
        return {"negative_prompt": negative_prompt}

    def kohya_state(self, denoiser: Any, denoiser_state: dict[str, Any], text_states: dict[str, dict[str, Any]],
                    alpha: float) -> dict[str, Any]:
        """peft adapter states (the denoiser's; each trained text encoder's by component name) -> the kohya file's
        tensors (A1111/ComfyUI): `lora_unet_<layer>` and the family's text-encoder prefixes."""
        from dbbatch.models.lora_export import kohya_state

        return kohya_state(denoiser_state, text_states, alpha, self.kohya_text_prefixes)

    def kohya_version(self, model: Any) -> Optional[tuple[str, str]]:
        """(kohya `ss_base_model_version`, `modelspec.architecture`) when the model is a known release."""
        return None
