"""A loaded base model of any family, split into the parts DreamBooth treats differently.

The VAE and (unless trained) the text encoders are frozen here, once; `snapshot`/`restore` put trained
weights back between subjects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from dbbatch.models.families.base import vae_scale_factor

__all__ = ["BaseModel", "vae_scale_factor"]


@dataclass
class BaseModel:
    """A loaded base model of a family, split into the parts DreamBooth treats differently."""

    denoiser: Any  # the family's denoiser (`family.denoiser` names its component: "unet", "transformer")
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    identity: str  # stable fingerprint: part of prior-cache keys and checkpoint compatibility checks
    source: str  # what the manifest said
    folder: Optional[Path] = None
    family: Any = None  # a dbbatch.models.families.Family; None: Stable Diffusion 1.x/2.x
    text_encoder_2: Any = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: Any = None
    _initial: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _changed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.family is None:
            from dbbatch.models import families

            self.family = families.by_name("sd")

    def __getattr__(self, name: str) -> Any:
        """The denoiser under its component name too (`model.unet`, `model.transformer`), as the pipeline names it."""
        family = self.__dict__.get("family")
        if family is not None and name == family.denoiser:
            return self.__dict__["denoiser"]
        raise AttributeError(name)

    @property
    def text_encoders(self) -> list[Any]:
        """The family's text encoders, in the order its conditioning uses them."""
        return [getattr(self, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, name) for name in self.family.tokenizers]

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """The components a full fine-tune may change: the denoiser and the text encoders."""
        return (self.family.denoiser, *self.family.text_encoders)

    def parts(self) -> dict[str, Any]:
        """Every component by its diffusers name (for the family's pipeline), the scheduler excepted."""
        return {name: getattr(self, name) for name in (self.family.denoiser, "vae", *self.family.text_encoders,
                                                       *self.family.tokenizers)}

    def pipeline(self, **replaced: Any) -> Any:
        """The family's diffusers pipeline over these very modules (with `replaced` ones), with the family's
        sampling scheduler (DDIM for the UNet families)."""
        return self.family.pipeline({**self.parts(), **replaced}, self.family.sampling_scheduler(self.scheduler_config))

    def encode(self, prompts: list[str], device: Any = None) -> dict[str, Any]:
        """Prompts -> their conditioning (no gradients), on the CPU unless `device`."""
        import torch

        with torch.no_grad():
            cond = self.family.encode(self.text_encoders, self.family.tokenize(self.tokenizers, prompts))
        return {k: v.to(device) if device is not None else v.cpu() for k, v in cond.items()}

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self.denoiser.config, self.vae.config)

    @property
    def latent_shift(self) -> float:
        """What the VAE's latents are shifted by before scaling (FLUX.1's VAE: 0.1159; SD's: none)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def snapshot(self, names: tuple[str, ...]) -> None:
        """Keep an in-memory (CPU) copy of the components `names` that full fine-tuning is about to change, to
        restore between subjects. Each is copied before the first subject that changes it (a LoRA-only batch
        never needs one; SDXL's second text encoder, 2.8 GB, only when it trains); marks the weights as about
        to change, so `restore` puts them back."""
        self._changed = True
        for name in names:
            if name not in self._initial:
                self._initial[name] = {k: v.detach().to("cpu", copy=True) for k, v in getattr(self, name).state_dict().items()}

    def restore(self) -> None:
        """Put the base weights back (after a subject changed them); never reloads from disk or the store."""
        if not self._changed:
            return
        for name, state in self._initial.items():
            getattr(self, name).load_state_dict(state)
        self._changed = False

    def to(self, device: Any) -> "BaseModel":
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(device)
        return self

    def hold_in(self, dtype_name: str) -> None:
        """Hold every component in `dtype_name` ("bf16", "fp16"; manifest `base_dtype`) from now on; the identity
        says so, so priors and checkpoints made at another precision are not mixed in."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(dtype)
        self.identity = f"{self.identity}:{dtype_name}"

    def freeze(self) -> None:
        for module in (self.vae, *self.text_encoders, self.denoiser):
            module.requires_grad_(False)
            module.eval()
