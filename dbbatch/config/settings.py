"""The settings a subject has and `defaults:` sets (train, priors, samples, evaluation, sdxl), as pydantic models.

Pure. `setting_paths` lists every dotted path a sweep may vary; `set_paths` the ones a parsed section sets.
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dbbatch.config.manifest_errors import closest

_Size = Annotated[int, Field(gt=0, le=16384)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# train.learning_rate when the manifest, the subject and the base model set none (per train.method)
DEFAULT_LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}
LORA_PRESETS = ("attention", "attention+ff", "all-linear+conv")


class LoraSettings(Strict):
    """The LoRA adapters trained on the frozen base model (train.method: lora)."""

    rank: int = Field(16, gt=0, le=1024, description="Rank r of each adapter (B @ A, A: r x in, B: out x r).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: an adapter adds (alpha / rank) x B @ A to its layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    target: Union[str, list[str]] = Field(
        "attention", description="UNet layers that get adapters: attention (to_q/to_k/to_v/to_out.0), attention+ff "
        "(and the feed-forward layers), all-linear+conv (every linear and conv layer of the down/mid/up blocks), or a "
        "list of module-name patterns (a name or its dotted tail, e.g. attn2.to_k; * and ? as in globs).")
    text_encoder: bool = Field(False, description="Also train adapters on the text encoder's attention (q/k/v/out_proj).")
    init: Literal["gaussian", "default"] = Field(
        "gaussian", description="A's initialisation (B starts at zero, so training starts from the base model): "
        "gaussian (std 1/rank) or default (peft's Kaiming-uniform).")

    @field_validator("target")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in LORA_PRESETS:
            close = closest(v, list(LORA_PRESETS))
            raise ValueError(f"must be a preset ({', '.join(LORA_PRESETS)}) or a list of module-name patterns, got {v!r}"
                             + (f"; did you mean {close!r}?" if close else ""))
        if isinstance(v, list):
            if not v:
                raise ValueError(f"must name a preset ({', '.join(LORA_PRESETS)}) or at least one module-name pattern")
            bad = next((p for p in v if not p.strip() or p != p.strip() or p.startswith(".") or p.endswith(".")), None)
            if bad is not None:
                raise ValueError(f"{bad!r} is not a module-name pattern (e.g. to_q, attn2.to_k, ff.net.*)")
        return v


class TrainConfig(Strict):
    """How one subject is fine-tuned."""

    method: Literal["full", "lora"] = Field(
        "full", description="full: fine-tune the UNet's (and optionally the text encoder's) weights; lora: train "
        "small LoRA adapters on the frozen base (train.lora), a few MB per subject.")
    max_steps: int = Field(400, gt=0, description="Optimizer steps for this subject.")
    learning_rate: Optional[float] = Field(
        None, gt=0, description="AdamW learning rate. null: the base model's default for the method if it carries "
        "one, else 5e-6 for full and 1e-4 for lora; config.yaml records the value used.")
    text_encoder_learning_rate: Optional[float] = Field(
        None, gt=0, description="Learning rate for the text encoder when it is trained (default: learning_rate)."
    )
    batch_size: int = Field(1, gt=0, description="Instance images per step (the same number of class images joins them).")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    train_text_encoder: bool = Field(False, description="Also fine-tune the CLIP text encoder.")
    with_prior_preservation: bool = Field(True, description="Add the class-prior loss (DreamBooth paper, eq. 2).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-prior loss term.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of the LR schedule.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    weight_decay: float = Field(1e-2, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes and a GPU.")
    seed: int = Field(0, ge=0, description="Seeds noise, timesteps and data order.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = Field(False, description="Trade compute for UNet activation memory.")
    checkpoint_every: int = Field(100, gt=0, description="Write and upload a resumable checkpoint every N steps.")
    checkpoints_keep: int = Field(1, ge=1, description="Stored checkpoints kept; older ones are pruned.")
    devices: Union[Literal["auto"], int] = Field("auto", description="Devices (GPUs) per subject, DDP when > 1.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (only with method: lora).")

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be 'auto' or >= 1, got {v}")
        return v


class PriorConfig(Strict):
    """Class-prior (regularisation) images made with the base model."""

    num_images: int = Field(100, ge=0, description="Class images per class prompt; 0 only with prior preservation off.")
    steps: int = Field(25, gt=0, description="DDIM denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=1.0, description="Classifier-free guidance scale.")
    batch_size: int = Field(4, gt=0, description="Images per forward pass.")
    seed: int = Field(0, ge=0, description="Image i is made with seed + i, so top-ups are deterministic.")
    negative_prompt: str = ""
    source: Literal["images", "base_model"] = Field(
        "images", description="What the class-prior loss compares with: images (class images generated with the base "
        "model, cached) or base_model (the frozen base model's own prediction for the class prompt at each step, "
        "on the instance latents: no class images; needs train.method lora).")


class SampleConfig(Strict):
    """Sample images rendered with the fine-tuned model."""

    prompts: list[str] = Field(
        default_factory=lambda: ["a photo of {token} {class_noun}"], description="One grid row each; may use {token}, {class_noun}."
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="One grid column each.")
    steps: int = Field(25, gt=0)
    guidance_scale: float = Field(7.5, ge=1.0)
    include_class_prompt: bool = Field(True, description="Add a row for the bare class prompt (shows prior drift).")
    negative_prompt: str = ""
    batch_size: int = Field(8, gt=0)


class EvaluationConfig(Strict):
    """Scores during training (README: Evaluation): DINO, CLIP-I, CLIP-T, class drift and PRES on fixed prompts and
    seeds, so the points of one subject (and of subjects with the same settings) compare."""

    clip: Optional[str] = Field(
        None, description="CLIP model for clip_i, clip_t and class_drift: builtin:toy-clip, a transformers CLIPModel "
        "folder (local or fsspec URL) or a hub id (e.g. openai/clip-vit-base-patch32). Evaluation is on when clip or "
        "dino is set.")
    dino: Optional[str] = Field(
        None, description="Self-supervised ViT for dino and pres: a transformers ViT or DINOv2 folder (local or fsspec "
        "URL) or hub id (e.g. facebook/dino-vits16), or a CLIPModel (its vision tower's features; builtin:toy-clip in "
        "the toy world).")
    prompts: Optional[list[str]] = Field(
        None, min_length=1, description="Token prompts to score, with {token} and {class_noun}; null: the sample "
        "prompts that contain {token} (else the instance prompt).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1,
                             description="One image per prompt and seed, the same at every evaluation point.")
    every: int = Field(100, gt=0, description="Score every N steps and at the last step.")
    keep: Literal["last", "best"] = Field(
        "last", description="Which weights are published: last (the last step's) or best (the step select_by scores "
        "highest).")
    select_by: Optional[Union[str, dict[str, float]]] = Field(
        None, description="What 'best' means: a metric (dino, clip_i, clip_t maximised; class_drift, pres "
        "minimised) or a weighted sum to maximise, e.g. {dino: 1.0, clip_t: 1.0, class_drift: -1.0}. null: dino when "
        "evaluation.dino is set, else clip_i.")
    flag_below: dict[str, float] = Field(
        default_factory=dict, description="Flag the subject for a human when a metric of its published step is below "
        "this, e.g. {dino: 0.5, clip_t: 0.2}.")
    flag_above: dict[str, float] = Field(
        default_factory=dict, description="Flag it when a metric is above this, e.g. {class_drift: 0.3}.")
    flag_not_improved: list[str] = Field(
        default_factory=list, description="Flag it when a metric of its published step is no better than the base "
        "model's (step 0) on the same prompts and seeds, e.g. [dino]: a threshold that needs no tuning per class.")

    @field_validator("select_by")
    @classmethod
    def _known_selection(cls, v: Any) -> Any:
        from dbbatch.config.metric_names import METRICS

        names = [v] if isinstance(v, str) else list(v or {})
        if isinstance(v, dict) and not v:
            raise ValueError(f"must name a metric or weight at least one ({', '.join(METRICS)})")
        for name in names:
            if name not in METRICS:
                close = closest(name, list(METRICS))
                raise ValueError(f"unknown metric {name!r}; one of {', '.join(METRICS)}" + (f"; did you mean {close!r}?" if close else ""))
        if isinstance(v, dict) and not all(math.isfinite(w) for w in v.values()):
            raise ValueError("weights must be finite numbers")
        return v

    @field_validator("flag_below", "flag_above")
    @classmethod
    def _known_flags(cls, v: dict[str, float]) -> dict[str, float]:
        from dbbatch.config.metric_names import METRICS

        for name, threshold in v.items():
            if name not in METRICS:
                close = closest(name, list(METRICS))
                raise ValueError(f"unknown metric {name!r}; one of {', '.join(METRICS)}" + (f"; did you mean {close!r}?" if close else ""))
            if not math.isfinite(threshold):
                raise ValueError(f"{name}: the threshold must be a finite number, got {threshold}")
        return v

    @field_validator("flag_not_improved")
    @classmethod
    def _improvable(cls, v: list[str]) -> list[str]:
        from dbbatch.config.metric_names import METRICS

        for name in v:
            if name == "class_drift":
                raise ValueError("class_drift is 0 for the base model by definition, so it cannot improve on it; use "
                                 "flag_above: {class_drift: ...}")
            if name not in METRICS:
                close = closest(name, list(METRICS))
                raise ValueError(f"unknown metric {name!r}; one of {', '.join(METRICS)}" + (f"; did you mean {close!r}?" if close else ""))
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.clip or self.dino)

    def selection(self) -> Union[str, dict[str, float]]:
        """select_by with null resolved."""
        if self.select_by is not None:
            return self.select_by
        return "dino" if self.dino else "clip_i"


class SdxlSettings(Strict):
    """Stable Diffusion XL's own keys (`base_model` of family SDXL only; refused for SD 1.x/2.x models)."""

    original_size: Optional[tuple[_Size, _Size]] = Field(
        None, description="SDXL micro-conditioning: the [height, width] the model is told the images had before "
        "resizing, in training, class priors and samples (null: the resolution). Larger values ask for the look of "
        "high-resolution sources.")
    crops_coords_top_left: tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]] = Field(
        (0, 0), description="SDXL micro-conditioning: the [top, left] crop offset the model is told; [0, 0] asks for "
        "centred, uncropped subjects.")
    target_size: Optional[tuple[_Size, _Size]] = Field(
        None, description="SDXL micro-conditioning: the [height, width] of the image asked for (null: the resolution).")
    train_text_encoder_2: bool = Field(
        False, description="Also train the second text encoder (OpenCLIP ViT-bigG in SDXL 1.0) when the text encoder "
        "trains (train.train_text_encoder with method full, train.lora.text_encoder with method lora).")

    @field_validator("original_size", "crops_coords_top_left", "target_size", mode="before")
    @classmethod
    def _pair(cls, v: Any, info: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != 2:
            what = "[top, left]" if info.field_name == "crops_coords_top_left" else "[height, width]"
            raise ValueError(f"must be {what} (two whole numbers), got {list(v)}")
        return v


class FluxSettings(Strict):
    """FLUX.1's own keys (`base_model` of family FLUX.1 only; refused for SD and SDXL models)."""

    train_guidance: float = Field(
        1.0, ge=0.0, le=100.0, description="FLUX.1-dev is guidance-distilled: the guidance value its transformer is given "
        "in every training step (1.0: the LoRA learns no one guidance level; diffusers' script uses 3.5). Refused for a "
        "model without a guidance embedding (FLUX.1-schnell). Rendering uses samples/priors.guidance_scale.")
    weighting_scheme: Literal["none", "logit_normal", "mode"] = Field(
        "none", description="How training timesteps are drawn (diffusers' compute_density_for_timestep_sampling): none "
        "(uniform, diffusers' default), logit_normal (logit_mean, logit_std; SD3's choice), mode (mode_scale).")
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0, description="Mean of the logit-normal timestep density.")
    logit_std: float = Field(1.0, gt=0.0, le=10.0, description="Standard deviation of the logit-normal timestep density.")
    mode_scale: float = Field(1.29, ge=0.0, le=1.5, description="Scale of the mode timestep density (1.29 as in SD3).")
    timestep_shift: float = Field(
        1.0, gt=0.0, le=100.0, description="Shift of the drawn sigmas, sigma' = s*sigma / (1 + (s-1)*sigma), toward "
        "noisier steps above 1 (some Flux trainers use 3); 1: none, as diffusers' script.")
    true_cfg_scale: float = Field(
        1.0, ge=1.0, le=30.0, description="Real classifier-free guidance for samples, priors and evaluation renders with "
        "samples.negative_prompt (FluxPipeline's true_cfg_scale; 1: off, one forward per step and no negative prompt).")


class SubjectSettings(Strict):
    """Keys that `defaults:` sets for every subject and each subject may override."""

    resolution: Optional[int] = Field(None, gt=0, description="Training/sampling size in pixels (default: the model's native size).")
    instance_prompt: str = "a photo of {token} {class_noun}"
    class_prompt: str = "a photo of {class_noun}"
    train: TrainConfig = Field(default_factory=TrainConfig)
    priors: PriorConfig = Field(default_factory=PriorConfig)
    samples: SampleConfig = Field(default_factory=SampleConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Scores during training, best "
                                         "checkpoint, flags (off unless evaluation.clip or evaluation.dino is set).")
    sdxl: Optional[SdxlSettings] = Field(None, description="Stable Diffusion XL keys (micro-conditioning sizes, the "
                                         "second text encoder); only for an SDXL base_model.")
    flux: Optional[FluxSettings] = Field(None, description="FLUX.1 keys (training guidance, timestep sampling, true "
                                         "CFG); only for a FLUX.1 base_model.")


def setting_paths() -> list[str]:
    """Every dotted setting path a subject may set (what a sweep may vary): resolution, train.lora.rank, ..."""
    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, info in model.model_fields.items():
            kind = info.annotation
            inner = [a for a in typing.get_args(kind) if isinstance(a, type) and issubclass(a, BaseModel)]
            kind = inner[0] if inner else kind  # an optional section (sdxl) holds settings too
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out += walk(kind, f"{prefix}{name}.")
            else:
                out.append(prefix + name)
        return out
    return walk(SubjectSettings, "")


FAMILY_SECTIONS: dict[str, type[BaseModel]] = {"sdxl": SdxlSettings, "flux": FluxSettings}
SECTIONS = {"train": TrainConfig, "priors": PriorConfig, "samples": SampleConfig, "evaluation": EvaluationConfig}


def set_paths(settings: SubjectSettings) -> set[str]:
    """Dotted paths of the keys a SubjectSettings (a parsed `defaults:`, subject or model file) sets."""
    paths = {k for k in settings.model_fields_set if k not in SECTIONS}
    for name in SECTIONS:
        if name in settings.model_fields_set:
            paths |= {f"{name}.{k}" for k in getattr(settings, name).model_fields_set}
    return paths
