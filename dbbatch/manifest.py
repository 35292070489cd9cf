"""The manifest: a pydantic v2 schema, defaults merging, and error reporting with field paths.

Everything here is pure: it parses text and returns objects. Checks that need the base model's tokenizer
or storage (token splitting, remote reachability) live in `validation.py`.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from pathlib import Path
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from dbbatch.errors import ManifestError
from dbbatch.manifest_errors import closest, load_yaml, problems_from, short
from dbbatch.sweeps import MAX_VARIANT_ID, MAX_VARIANTS

SUBJECT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANT_IN_TEXT = re.compile(r"[a-z0-9][a-z0-9._-]*~[a-z0-9._=,-]+")  # a variant id inside an error line
_EXPONENT_NUMBER = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")
PROMPT_FIELDS = {"token", "class_noun"}
ID_RULE = "use 1-64 lower-case ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def _id_suggestion(v: str) -> Optional[str]:
    """A safe id close to `v`, or None when `v` has characters with no ASCII equivalent."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", v) if not unicodedata.combining(c))
    if not plain.isascii():
        return None
    plain = re.sub(r"[^a-z0-9._-]+", "-", plain.lower()).lstrip("._-")[:64].rstrip("-")
    return plain if SUBJECT_ID_RE.match(plain) else None


def id_problem(v: str) -> Optional[str]:
    """Why `v` cannot name an output folder, or None. Ids become path segments under `output`, so anything
    that could escape it, hide it, or collide with another id on a case-insensitive filesystem is refused."""
    if SUBJECT_ID_RE.match(v):
        return None
    hint = _id_suggestion(v)
    fix = f"use {hint!r}" if hint else ID_RULE
    if not v:
        return f"must not be empty; {ID_RULE}"
    if v.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", v):
        return f"{v!r} is an absolute path; an id names one folder inside output: {fix}"
    if ".." in re.split(r"[/\\]", v) or v in (".", ".."):
        return f"{v!r} would escape the output folder ('..' is not allowed); {fix}"
    if "/" in v or "\\" in v:
        return f"{v!r} contains a path separator, so it would name a nested folder; {fix}"
    odd = next((c for c in v if not c.isascii()), None)
    if odd is not None:
        name = unicodedata.name(odd, "unnamed")
        return (f"{v!r} contains the non-ASCII character {odd!r} (U+{ord(odd):04X} {name}), which can look like an "
                f"ASCII letter but names a different folder; {fix if hint else 'retype the id in plain ASCII: ' + ID_RULE}")
    if any(c.isupper() for c in v):
        return (f"{v!r} has upper-case letters; {v!r} and {v.lower()!r} are the same folder on case-insensitive "
                f"filesystems (macOS, Windows): {fix}")
    if len(v) > 64:
        return f"{v!r} is {len(v)} characters long, the limit is 64; {fix}"
    if v[0] in "._-":
        return f"{v!r} starts with {v[0]!r} (a hidden or option-like folder name); {fix}"
    return f"{v!r} contains characters other than a-z, 0-9, '.', '_', '-'; {fix}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# train.learning_rate when the manifest, the subject and the base model set none (per train.method)
DEFAULT_LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}
LORA_PRESETS = ("attention", "attention+ff", "all-linear+conv")


class LoraSettings(_Strict):
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


class TrainConfig(_Strict):
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


class PriorConfig(_Strict):
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


class SampleConfig(_Strict):
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


class EvaluationConfig(_Strict):
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
        from dbbatch.evaluation import METRICS

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
        from dbbatch.evaluation import METRICS

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
        from dbbatch.evaluation import METRICS

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


_Size = Annotated[int, Field(gt=0, le=16384)]


class SdxlSettings(_Strict):
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


class SubjectSettings(_Strict):
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


class SubjectEntry(SubjectSettings):
    """One subject: a person, pet or product, with its own photos and identifier token."""

    id: str = Field(description="[a-z0-9][a-z0-9._-]*, unique; names the output folder.")
    token: str = Field(min_length=1, description="Rare identifier word, e.g. sks.")
    class_noun: str = Field(min_length=1, description="What the subject is, e.g. dog.")
    images: Union[str, list[str]] = Field(description="A folder, a glob, or a list of files/URLs.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict, description="Try this subject over a grid of settings: {dotted setting path: [values]}, "
        "e.g. {train.learning_rate: [1.0e-4, 5.0e-5], train.lora.rank: [4, 16]}. Each combination becomes a subject of "
        "its own (a variant) with the id <id>~<name>=<value>,... (README: Sweeps); id, token, class_noun and images "
        f"cannot be swept; at most {MAX_VARIANTS} variants per subject.")
    # Set on the variants a sweep expands into (`_expand_sweeps`): the subject they vary, the values they use,
    # and the subjects[i] of the manifest that wrote them (error lines name it).
    _sweep_of: Optional[str] = PrivateAttr(None)
    _swept: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: Optional[int] = PrivateAttr(None)

    @field_validator("sweep")
    @classmethod
    def _sweepable(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from dbbatch.sweeps import count, sweep_problem

        known = setting_paths()
        # YAML 1.1 (PyYAML) reads 5e-5 (no dot) as a string: a swept number written so is a number
        v = {path: [float(x) if isinstance(x, str) and _EXPONENT_NUMBER.match(x) else x for x in values]
             if isinstance(values, list) else values for path, values in v.items()}
        for path, values in v.items():
            problem = sweep_problem(path, known)
            if problem:
                raise ValueError(problem)
            if not values:
                raise ValueError(f"{path}: give at least one value")
            odd = next((x for x in values if isinstance(x, (dict, list))), None)
            if odd is not None:
                raise ValueError(f"{path}: {short(odd)} is not a single value; sweep values are numbers, strings, "
                                 "true/false or null")
            if len({repr(x) for x in values}) != len(values):
                raise ValueError(f"{path}: a value is listed twice; each combination must differ")
        if count(v) > MAX_VARIANTS:
            raise ValueError(f"expands into {count(v)} variants, at most {MAX_VARIANTS}; sweep fewer values (or split "
                             "the subject)")
        return v

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        problem = id_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("token")
    @classmethod
    def _one_word(cls, v: str) -> str:
        if v != v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"must be one word without spaces, got {v!r}")
        return v

    @field_validator("images")
    @classmethod
    def _non_empty(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("must name a folder, a glob or at least one file")
        return v


class PackingConfig(_Strict):
    """Training several subjects' LoRA adapters in one step over the shared frozen base (README: packing)."""

    subjects_per_step: int = Field(
        1, ge=1, le=64, description="Up to this many subjects of one training shape (method lora, every train setting "
        "but the seed equal, same resolution and priors.source) train together, in manifest order; 1: one at a time.")


# Keys people put in a tracking section for credentials: refused with where the credential goes instead.
_CREDENTIAL_KEYS = {"wandb": ("api_key", "key", "token", "password"),
                    "mlflow": ("username", "password", "token", "api_key", "key")}
_CREDENTIAL_ENV = {"wandb": "WANDB_API_KEY", "mlflow": "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"}


def _no_credentials(backend: str, data: Any) -> Any:
    if isinstance(data, dict):
        for key in _CREDENTIAL_KEYS[backend]:
            if key in data:
                raise ValueError(f"{key}: credentials never go in the manifest (it is committed, shared and embedded in Job specs); "
                                 f"set {_CREDENTIAL_ENV[backend]} in the environment")
    return data


class WandbTracking(_Strict):
    """Weights & Biases (pip install 'dbbatch[wandb]'); the API key comes from WANDB_API_KEY."""

    project: str = Field(min_length=1, max_length=128, description="W&B project: one run per subject in it.")
    entity: Optional[str] = Field(None, description="W&B team or user (null: the API key's default entity).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to W&B; offline: write run files only (`wandb sync` uploads them later); "
        "disabled: no run.")
    tags: list[str] = Field(default_factory=list, description="Tags on every run (dbbatch adds the batch's run id).")
    dir: Optional[str] = Field(None, description="Local folder for W&B's run files, relative to the manifest's folder "
                               "(null: $WANDB_DIR, else <work-dir>/wandb; offline runs stay there for `wandb sync`).")


    @field_validator("project", "entity")
    @classmethod
    def _w_and_b_name(cls, v: Optional[str]) -> Optional[str]:
        bad = next((c for c in "/\\#?%:" if v is not None and c in v), None)
        if bad is not None:
            raise ValueError(f"{v!r} contains {bad!r}; W&B names cannot contain / \\ # ? % or :")
        return v


class MlflowTracking(_Strict):
    """MLflow (pip install 'dbbatch[mlflow]'); credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""

    tracking_uri: Optional[str] = Field(
        None, description="An MLflow tracking server (http(s)://host:port) or store URI (sqlite:///path/mlflow.db). "
        "null: $MLFLOW_TRACKING_URI if set, else a local SQLite store beside the output (<output>/_mlflow/mlflow.db for a local output, else "
        "<work-dir>/mlflow/mlflow.db). No credentials in it.")
    experiment: str = Field(min_length=1, max_length=256, description="MLflow experiment: one run per subject in it.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_userinfo(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.username or parts.password:
            raise ValueError("has a user name or password in it; credentials never go in the manifest: set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                             "environment and give the URI without them")
        if parts.scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"):
            raise ValueError(f"{short(v)} is not an MLflow tracking URI; use http(s)://host:port for a server or "
                             "sqlite:///path/mlflow.db for a local store")
        return v


class TrackingConfig(_Strict):
    """Where each subject's training is tracked: TensorBoard files beside its outputs, W&B and MLflow runs."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files (uploaded to <output>/<id>/logs/).")
    wandb: Optional[WandbTracking] = Field(None, description="One W&B run per subject (README: Tracking).")
    mlflow: Optional[MlflowTracking] = Field(None, description="One MLflow run per subject (README: Tracking).")

    @field_validator("wandb", "mlflow", mode="before")
    @classmethod
    def _credentials_from_environment(cls, v: Any, info: Any) -> Any:
        return _no_credentials(info.field_name, v)

    def backends(self) -> list[str]:
        """The tracking services asked for (not counting TensorBoard or W&B mode disabled)."""
        return [name for name in ("wandb", "mlflow") if getattr(self, name) is not None
                and not (name == "wandb" and self.wandb.mode == "disabled")]


class Manifest(_Strict):
    """A batch of DreamBooth subjects trained from one base model."""

    version: Literal[1] = 1
    base_model: str = Field("builtin:tiny-sd", description="builtin:tiny-sd, builtin:small-sd, builtin:tiny-sdxl, builtin:toy-sd, a diffusers folder of a supported family (StableDiffusionPipeline, StableDiffusionXLPipeline; local or fsspec URL) or a hub id.")
    output: str = Field(description="Where results go: a local path or fsspec URL.")
    prior_cache: Optional[str] = Field(None, description="Class-prior cache shared across runs (default <output>/_priors).")
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-protocol fsspec options, e.g. s3: {endpoint_url: ...}. No secrets here."
    )
    output_dtype: Literal["fp32", "fp16"] = Field("fp32", description="Precision of the saved model weights.")
    model_format: Optional[Literal["full", "delta", "lora"]] = Field(
        None, description="full: self-contained diffusers folder (with method lora: the adapters merged in, written "
        "beside lora/); delta: changed components + base reference (method full); lora: only the adapters in lora/ "
        "(method lora). null: lora for method lora, full otherwise."
    )
    packing: PackingConfig = Field(default_factory=PackingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard, W&B and MLflow "
                                     "tracking of every subject (README: Tracking).")
    defaults: SubjectSettings = Field(default_factory=SubjectSettings)
    subjects: list[SubjectEntry] = Field(min_length=1)
    # Setting path -> where the base model's carried default came from ("model <base_model> (<file>)"), for
    # the keys `apply_model_defaults` filled into `defaults`; empty when the model carries none.
    _carried: dict[str, str] = PrivateAttr(default_factory=dict)
    # train.method -> learning rate the base model carries for it (its file's train.learning_rate given per method)
    _method_lrs: dict[str, float] = PrivateAttr(default_factory=dict)
    _method_lrs_from: str = PrivateAttr("")


class Subject(BaseModel):
    """A subject with every setting resolved (defaults merged, prompts formatted). What the worker uses."""

    model_config = ConfigDict(frozen=True)

    id: str
    index: int
    token: str
    class_noun: str
    images: list[str]
    resolution: Optional[int]
    instance_template: str = "a photo of {token} {class_noun}"  # instance_prompt before formatting
    instance_prompt: str
    class_prompt: str
    train: TrainConfig
    priors: PriorConfig
    samples: SampleConfig
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sdxl: Optional[SdxlSettings] = None  # the SDXL section, when defaults or the subject set one
    model_format: str = "full"  # the manifest's model_format, resolved for this subject's train.method
    # Where each tracked setting's value came from: subjects[i], defaults, the base model's file, or dbbatch.
    settings_from: dict[str, str] = Field(default_factory=dict)
    sweep_of: Optional[str] = None  # a sweep variant: the subject it varies (config.yaml records it)
    swept: dict[str, Any] = Field(default_factory=dict)  # a variant's swept settings: {dotted path: value}

    def sample_prompts(self) -> list[str]:
        prompts = [format_prompt(p, self.token, self.class_noun) for p in self.samples.prompts]
        if self.samples.include_class_prompt and self.class_prompt not in prompts:
            prompts.append(self.class_prompt)
        return prompts

    def evaluation_templates(self) -> list[str]:
        """The token prompts evaluation scores, unformatted: evaluation.prompts, else the sample prompts that
        contain {token}, else the instance prompt."""
        if self.evaluation.prompts:
            return list(self.evaluation.prompts)
        with_token = [p for p in self.samples.prompts if "{token}" in p]
        return with_token or [self.instance_template]


# ---------------------------------------------------------------------------------------------------------
# Parsing and error reporting

def format_prompt(template: str, token: str, class_noun: str) -> str:
    return template.format(token=token, class_noun=class_noun)


def _placeholder_problems(template: str, where: str) -> list[str]:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return [f"{where}: malformed braces in {template!r} ({e}); write {{{{ and }}}} for literal braces"]
    for name, spec, conv in fields:
        if name not in PROMPT_FIELDS:
            close = closest(name, sorted(PROMPT_FIELDS))
            hint = f"; did you mean {{{close}}}?" if close else ""
            return [f"{where}: unknown placeholder {{{name}}} in {short(template)}{hint} (available: {{token}}, {{class_noun}})"]
        if spec or conv:
            # a format spec is an easy memory bomb ({token:>999999999}) and never needed in a prompt
            return [f"{where}: placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} in {short(template)} "
                    f"has a format spec or conversion; write {{{name}}}"]
    return []


def parse_manifest(text: str, source: str = "manifest") -> Manifest:
    """YAML text -> validated Manifest; every problem found is reported at once as ManifestError.

    Schema errors and the checks on raw values (placeholders, duplicate ids, token == class noun) run
    together, so one `dbbatch validate` lists all of them; checks on merged settings need a valid schema."""
    data = load_yaml(text, source)
    problems: list[str] = []
    manifest: Optional[Manifest] = None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        problems += problems_from(e, Manifest)
    problems += _raw_checks(data)
    if manifest is not None and not problems:
        manifest, swept = _expand_sweeps(manifest, data["subjects"])
        problems += swept
    if manifest is not None and not problems:  # merging formats the prompts: only once they are known good
        problems += once_per_sweep(_merged_checks(manifest))
    if problems or manifest is None:
        raise ManifestError(sorted(problems, key=_subject_order), source)
    return manifest


def _subject_order(problem: str) -> tuple[int, int]:
    """Sort key: top-level problems first, then subject by subject (the order of the file)."""
    m = re.match(r"subjects\[(\d+)\]", problem)
    return (1, int(m.group(1))) if m else (0, 0)


def _raw_checks(data: dict[str, Any]) -> list[str]:
    """Checks that need no valid schema; values of the wrong type are skipped (the schema reports them)."""
    problems: list[str] = []
    subjects = data.get("subjects") if isinstance(data.get("subjects"), list) else []
    for where, section in [("defaults", data.get("defaults"))] + [(f"subjects[{i}]", s) for i, s in enumerate(subjects)]:
        if not isinstance(section, dict):
            continue
        for key in ("instance_prompt", "class_prompt"):
            if isinstance(section.get(key), str):
                problems += _placeholder_problems(section[key], f"{where}.{key}")
        for name in ("samples", "evaluation"):
            part = section.get(name)
            if isinstance(part, dict) and isinstance(part.get("prompts"), list):
                for j, p in enumerate(part["prompts"]):
                    if isinstance(p, str):
                        problems += _placeholder_problems(p, f"{where}.{name}.prompts[{j}]")
    seen: dict[str, int] = {}
    for i, s in enumerate(subjects):
        if not isinstance(s, dict):
            continue
        sid, token, noun = s.get("id"), s.get("token"), s.get("class_noun")
        if isinstance(sid, str) and id_problem(sid) is None:  # an unsafe id is reported by the schema
            if sid in seen:
                problems.append(f"subjects[{i}].id: duplicate id {sid!r} (also subjects[{seen[sid]}]); ids name output folders, make them unique")
            seen.setdefault(sid, i)
        if isinstance(token, str) and isinstance(noun, str) and token.strip() and token.casefold() == noun.strip().casefold():
            problems.append(f"subjects[{i}].token: the token {token!r} is the class noun itself; pick a rare word such as 'sks'")
    return problems


def once_per_sweep(problems: list[str]) -> list[str]:
    """A problem every variant of a sweep has (a setting the sweep does not change) is said once, for the first."""
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for k, p in enumerate(problems):
        key = VARIANT_IN_TEXT.sub("<variant>", p)
        first.setdefault(key, k)
        counts[key] = counts.get(key, 0) + 1
    return [problems[k] + (f" (and {counts[key] - 1} more variant(s) of this sweep)" if counts[key] > 1 else "")
            for key, k in first.items()]


def where_of(m: Manifest, i: int) -> str:
    """How error lines name subject i: `subjects[k]`, or `subjects[k](<variant id>)` for a sweep's variant."""
    s = m.subjects[i]
    return source_of(m, i) + (f"({s.id})" if s._sweep_of is not None else "")


def source_of(m: Manifest, i: int) -> str:
    """`subjects[k]` as the manifest file numbers it (a sweep's variants all come from one entry)."""
    s = m.subjects[i]
    return f"subjects[{i if s._source is None else s._source}]"


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


def _expand_sweeps(m: Manifest, raw_subjects: list[Any]) -> tuple[Manifest, list[str]]:
    """The manifest with every subject that has a `sweep` replaced by its variants (dbbatch/sweeps.py), each
    validated as a subject of its own; and the problems of the swept values, each named once."""
    from dbbatch.sweeps import expand

    if not any(s.sweep for s in m.subjects):
        return m, []
    out: list[SubjectEntry] = []
    problems: list[str] = []
    for i, (s, raw) in enumerate(zip(m.subjects, raw_subjects)):
        if not s.sweep:
            s._source = i  # its place in the file, which the variants before it moved in the list
            out.append(s)
            continue
        for vid, values, variant in expand(raw, s.sweep):
            try:
                entry = SubjectEntry.model_validate(variant)
            except ValidationError as e:
                described = ", ".join(f"{p}={short(v)}" for p, v in values.items())
                problems += [f"subjects[{i}].sweep: {p} (in the variant {described})" for p in problems_from(e, SubjectEntry)]
                continue
            if len(vid) > MAX_VARIANT_ID:
                problems.append(f"subjects[{i}].sweep: the variant id {vid!r} is {len(vid)} characters long, at most "
                                f"{MAX_VARIANT_ID}; shorten the subject's id or sweep fewer settings")
                break
            entry = entry.model_copy(update={"id": vid, "sweep": {}})
            entry._sweep_of, entry._swept, entry._source = s.id, dict(values), i
            out.append(entry)
    # the same bad value fails every variant that has it: say it once
    first: dict[str, str] = {}
    for p in problems:
        first.setdefault(p.split(" (in the variant ")[0], p)
    problems = list(first.values())
    return m.model_copy(update={"subjects": out}), problems


def _merged_checks(m: Manifest) -> list[str]:
    """Checks on each subject's settings after `defaults` are merged in."""
    problems: list[str] = []
    for i, subject in enumerate(resolve_subjects(m, base_dir=None)):
        t = subject.train
        where = where_of(m, i)
        if t.lr_warmup_steps >= t.max_steps:
            problems.append(f"{where}.train.lr_warmup_steps: must be < max_steps ({t.max_steps}), got {t.lr_warmup_steps}")
        from_images = subject.priors.source == "images"
        if t.with_prior_preservation and from_images and subject.priors.num_images == 0:
            problems.append(f"{where}.priors.num_images: must be > 0 with train.with_prior_preservation, got 0")
        if not from_images and not t.with_prior_preservation:
            problems.append(f"{where}.priors.source: base_model is a kind of prior preservation, but "
                            "train.with_prior_preservation is false; set it true or remove priors.source")
        if not from_images and t.method != "lora":
            problems.append(f"{where}.priors.source: base_model needs train.method lora (the base model's prediction "
                            "is the adapters switched off); use source: images with method full")
        if t.method == "full" and _lora_given(m, i):
            problems.append(f"{where}.train.lora: set, but train.method is full (LoRA settings apply to method lora); "
                            "set train.method: lora or remove train.lora")
        if subject.sdxl is not None and subject.sdxl.train_text_encoder_2 and not (
                t.lora.text_encoder if t.method == "lora" else t.train_text_encoder):
            key = "train.lora.text_encoder" if t.method == "lora" else "train.train_text_encoder"
            problems.append(f"{where}.sdxl.train_text_encoder_2: trains the second text encoder beside the first, but "
                            f"{key} is false; set {key}: true or remove sdxl.train_text_encoder_2")
        if t.method == "lora" and t.train_text_encoder:
            problems.append(f"{where}.train.train_text_encoder: fine-tunes the whole text encoder, but train.method is "
                            "lora; set train.lora.text_encoder: true for text-encoder adapters")
        problems += _evaluation_problems(subject.evaluation, t, f"{where}.evaluation", subject.id)
        fmt = m.model_format
        if t.method == "lora" and fmt == "delta":
            problems.append(f"model_format: delta stores fine-tuned components, but {where} ({subject.id}) trains LoRA "
                            "adapters; use model_format lora (the adapters) or full (merged into a full pipeline)")
        if t.method == "full" and fmt == "lora":
            problems.append(f"model_format: lora stores LoRA adapters, but {where} ({subject.id}) trains with "
                            "method full; set train.method: lora or model_format full (or delta)")
    return problems


def _evaluation_problems(e: EvaluationConfig, t: TrainConfig, where: str, sid: str) -> list[str]:
    """Evaluation settings that cannot work together (metrics whose model is not set, keep: best without scores)."""
    from dbbatch.evaluation import NEEDS

    problems = []
    if not e.enabled:
        set_keys = [k for k, on in (("keep", e.keep == "best"), ("select_by", e.select_by is not None),
                                    ("flag_below", e.flag_below), ("flag_above", e.flag_above),
                                    ("flag_not_improved", e.flag_not_improved)) if on]
        if set_keys:
            key = set_keys[0]
            problems.append(f"{where}.{key}: set, but no evaluation model is ({sid}); set evaluation.clip (and/or "
                            "evaluation.dino), e.g. clip: builtin:toy-clip on the toy world")
        return problems
    for j, template in enumerate(e.prompts or []):
        if "{token}" not in template:
            problems.append(f"{where}.prompts[{j}]: {template!r} has no {{token}}; evaluation scores the subject's own "
                            f"prompts (the class prompt is scored for class_drift and pres already) ({sid})")
    selection = e.selection()
    named = [("select_by", m) for m in ([selection] if isinstance(selection, str) else selection)]
    named += [("flag_below", m) for m in e.flag_below] + [("flag_above", m) for m in e.flag_above]
    named += [("flag_not_improved", m) for m in e.flag_not_improved]
    for key, metric in named:
        model = NEEDS[metric]
        if getattr(e, model) is None:
            problems.append(f"{where}.{key}: {metric} needs evaluation.{model}, which is not set ({sid}); set it or "
                            f"use a metric of evaluation.{'dino' if model == 'clip' else 'clip'}")
            break
    if e.keep == "best" and e.every >= t.max_steps:
        problems.append(f"{where}.every: {e.every} scores only the last step (train.max_steps {t.max_steps}), so keep: "
                        f"best has nothing to choose from ({sid}); lower every or use keep: last")
    if e.keep == "best" and t.devices not in ("auto", 1):
        problems.append(f"{where}.keep: best scores the subject during training, which runs in one process; with "
                        f"train.devices {t.devices} use keep: last (the last step is still scored) ({sid})")
    return problems


def _lora_given(m: Manifest, i: int) -> bool:
    """Whether subject i's LoRA settings are its own to check: it sets train.lora itself, or `defaults` set it
    and the subject does not override train.method (a subject that says `method: full` opts out of them)."""
    own, given = _set_paths(m.subjects[i]), _set_paths(m.defaults)
    return "train.lora" in own or ("train.lora" in given and "train.method" not in own)


def _merge(base: BaseModel, *overrides: BaseModel) -> dict[str, Any]:
    """`base` with each override's set keys laid over it; a nested section (train.lora) is merged key by key,
    so a subject's `train: {lora: {rank: 4}}` keeps the `lora.target` its defaults set."""
    merged = base.model_dump()
    for o in overrides:
        _overlay(merged, o)
    return merged


def _overlay(merged: dict[str, Any], o: BaseModel) -> None:
    for key in o.model_fields_set:
        value = getattr(o, key)
        if isinstance(value, BaseModel) and isinstance(merged.get(key), dict):
            _overlay(merged[key], value)
        else:
            merged[key] = o.model_dump(include={key})[key]


# Settings whose origin `Subject.settings_from` records (config.yaml, `dbbatch validate --show-settings`): the
# ones a base model may carry, plus any other key its defaults file sets.
TRACKED_SETTINGS = ("resolution", "train.learning_rate", "train.max_steps", "priors.num_images")
_SECTIONS = {"train": TrainConfig, "priors": PriorConfig, "samples": SampleConfig, "evaluation": EvaluationConfig}


def _set_paths(settings: SubjectSettings) -> set[str]:
    """Dotted paths of the keys a SubjectSettings (a parsed `defaults:`, subject or model file) sets."""
    paths = {k for k in settings.model_fields_set if k not in _SECTIONS}
    for name in _SECTIONS:
        if name in settings.model_fields_set:
            paths |= {f"{name}.{k}" for k in getattr(settings, name).model_fields_set}
    return paths


def apply_model_defaults(m: Manifest, carried: dict[str, Any], origin: str) -> Manifest:
    """The manifest with the base model's training defaults (`carried`, SubjectSettings keys) filled into
    `defaults` wherever the manifest sets nothing: manifest `defaults` and each subject's keys still win."""
    if not carried:
        return m
    carried, method_lrs = _split_method_lrs(carried, origin)
    try:
        model = SubjectSettings.model_validate(carried)
    except ValidationError as e:
        raise ManifestError(problems_from(e, SubjectSettings), origin) from None
    d = m.defaults
    filled: dict[str, Any] = {}
    for key in ("resolution", "instance_prompt", "class_prompt"):
        value_from = d if key in d.model_fields_set or key not in model.model_fields_set else model
        if key in d.model_fields_set or key in model.model_fields_set:
            filled[key] = getattr(value_from, key)
    for name, cls in _SECTIONS.items():
        merged = {**getattr(model, name).model_dump(exclude_unset=True), **getattr(d, name).model_dump(exclude_unset=True)}
        filled[name] = cls(**merged)
    if d.sdxl is not None or model.sdxl is not None:
        filled["sdxl"] = SdxlSettings(**_merge(SdxlSettings(), *[x.sdxl for x in (model, d) if x.sdxl is not None]))
    out = m.model_copy(update={"defaults": SubjectSettings(**filled)})
    out._carried = {path: origin for path in _set_paths(model) - _set_paths(d)}
    if "train.learning_rate" not in _set_paths(d):
        out._method_lrs, out._method_lrs_from = method_lrs, origin
    problems = _merged_checks(out)
    if problems:
        raise ManifestError(problems, origin)
    return out


def _split_method_lrs(carried: dict[str, Any], origin: str) -> tuple[dict[str, Any], dict[str, float]]:
    """A model's defaults file may give train.learning_rate per method ({"full": 5e-4, "lora": 2e-3}): those
    apply where the manifest sets no learning rate, by each subject's method. Returns (the rest, that map)."""
    train = carried.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("learning_rate"), dict):
        return carried, {}
    lrs = train["learning_rate"]
    bad = [k for k, v in lrs.items() if k not in DEFAULT_LEARNING_RATES or not isinstance(v, (int, float)) or v <= 0]
    if bad:
        raise ManifestError([f"train.learning_rate: per-method values must be {{full: <rate>, lora: <rate>}} with rates "
                             f"> 0; {bad[0]!r} is not"], origin)
    rest = {**carried, "train": {k: v for k, v in train.items() if k != "learning_rate"}}
    return rest, {k: float(v) for k, v in lrs.items()}


def with_model_defaults(m: Manifest, base_dir: Optional[Path]) -> Manifest:
    """`apply_model_defaults` with what the manifest's base model carries (a built-in's metadata, or
    dbbatch_defaults.json beside a local folder's model_index.json); unchanged when it carries nothing."""
    from dbbatch.models import model_defaults

    carried, path = model_defaults(m.base_model, base_dir)
    return apply_model_defaults(m, carried, f"model {m.base_model} ({path})") if carried else m


def settings_sources(m: Manifest, i: int) -> dict[str, str]:
    """Where subject i's tracked settings come from: `subjects[i]`, `defaults`, the model's file, `dbbatch`."""
    s = m.subjects[i]
    own, given = _set_paths(s), _set_paths(m.defaults)
    out = {}
    for path in sorted(set(TRACKED_SETTINGS) | set(m._carried) | set(s._swept)):
        if path in s._swept:
            out[path] = f"{source_of(m, i)}.sweep"
        elif path in own:
            out[path] = source_of(m, i)
        elif path in m._carried:
            out[path] = m._carried[path]
        elif path in given:
            out[path] = "defaults"
        elif path == "train.learning_rate" and _method(m, i) in m._method_lrs:
            out[path] = m._method_lrs_from
        else:
            out[path] = "dbbatch"
    return out


def resolve_subjects(m: Manifest, base_dir: Optional[Path]) -> list[Subject]:
    """Merge built-in defaults <- manifest `defaults` <- the subject's own keys, one nested section at a time.
    (`defaults` includes the base model's carried defaults once `with_model_defaults` has run.)"""
    out = []
    for i, s in enumerate(m.subjects):
        d = m.defaults
        flat = {k: v for k, v in _merge(SubjectSettings(), d, s).items() if k in ("resolution", "instance_prompt", "class_prompt")}
        images = [s.images] if isinstance(s.images, str) else list(s.images)
        if base_dir is not None:
            images = [resolve_location(x, base_dir) for x in images]
        out.append(
            Subject(
                id=s.id,
                index=i,
                token=s.token,
                class_noun=s.class_noun,
                images=images,
                resolution=flat["resolution"],
                instance_prompt=format_prompt(flat["instance_prompt"], s.token, s.class_noun),
                class_prompt=format_prompt(flat["class_prompt"], s.token, s.class_noun),
                train=_resolved_train(m, TrainConfig(**_merge(TrainConfig(), d.train, s.train))),
                priors=PriorConfig(**_merge(PriorConfig(), d.priors, s.priors)),
                samples=SampleConfig(**_merge(SampleConfig(), d.samples, s.samples)),
                evaluation=EvaluationConfig(**_merge(EvaluationConfig(), d.evaluation, s.evaluation)),
                sdxl=SdxlSettings(**_merge(SdxlSettings(), *[x.sdxl for x in (d, s) if x.sdxl is not None]))
                if d.sdxl is not None or s.sdxl is not None else None,
                instance_template=flat["instance_prompt"],
                model_format=m.model_format or ("lora" if _method(m, i) == "lora" else "full"),
                settings_from=settings_sources(m, i),
                sweep_of=s._sweep_of,
                swept=dict(s._swept),
            )
        )
    return out


def _method(m: Manifest, i: int) -> str:
    return TrainConfig(**_merge(TrainConfig(), m.defaults.train, m.subjects[i].train)).method


def _resolved_train(m: Manifest, train: TrainConfig) -> TrainConfig:
    """`train` with learning_rate null replaced by the base model's default for the method, else dbbatch's."""
    if train.learning_rate is not None:
        return train
    lr = m._method_lrs.get(train.method, DEFAULT_LEARNING_RATES[train.method])
    return train.model_copy(update={"learning_rate": lr})


def resolve_location(location: str, base_dir: Path) -> str:
    """Relative local paths resolve against the manifest's folder; URLs and absolute paths stay as they are."""
    if "://" in location or location.startswith("builtin:") or Path(location).is_absolute():
        return location
    resolved = str((base_dir / location).resolve())
    # keep a trailing slash: it tells a folder from a file before anything is listed
    return resolved + "/" if location.endswith("/") else resolved


def load_manifest(path: Path) -> tuple[Manifest, Path]:
    """Read a manifest file; return it with the folder its relative paths resolve against."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"no such file (looked for {path.resolve()}); check the path"], str(path)) from None
    except UnicodeDecodeError:
        raise ManifestError(["the file is not UTF-8 text; a manifest is a YAML text file (is this a binary or another encoding?)"], str(path)) from None
    except OSError as e:
        raise ManifestError([f"cannot read the file: {e.strerror}; pass the manifest YAML file"], str(path)) from None
    base_dir = path.resolve().parent
    return with_model_defaults(parse_manifest(text, str(path)), base_dir), base_dir


def json_schema() -> dict[str, Any]:
    return Manifest.model_json_schema()
