"""The manifest's schema (pydantic v2): subjects, packing and the manifest itself, and a resolved Subject.

Pure: the settings sections are in settings.py, tracking in tracking.py; parsing and error reporting in
parse.py, defaults merging in resolve.py. Checks that need the base model's tokenizer or storage (token
splitting, remote reachability) live in `batch/validation.py`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from dbbatch.config.ids import id_problem
from dbbatch.config.manifest_errors import short
from dbbatch.config.settings import (
    EvaluationConfig,
    PriorConfig,
    SampleConfig,
    FluxSettings,
    SdxlSettings,
    Strict,
    SubjectSettings,
    TrainConfig,
    setting_paths,
)
from dbbatch.config.sweeps import MAX_VARIANTS
from dbbatch.config.tracking import TrackingConfig

_EXPONENT_NUMBER = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")
PROMPT_FIELDS = {"token", "class_noun"}


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
        from dbbatch.config.sweeps import count, sweep_problem

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


class PackingConfig(Strict):
    """Training several subjects' LoRA adapters in one step over the shared frozen base (README: packing)."""

    subjects_per_step: int = Field(
        1, ge=1, le=64, description="Up to this many subjects of one training shape (method lora, every train setting "
        "but the seed equal, same resolution and priors.source) train together, in manifest order; 1: one at a time.")


class Manifest(Strict):
    """A batch of DreamBooth subjects trained from one base model."""

    version: Literal[1] = 1
    base_model: str = Field("builtin:tiny-sd", description="builtin:tiny-sd, builtin:small-sd, builtin:tiny-sdxl, builtin:tiny-flux, builtin:toy-sd, a diffusers folder of a supported family (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline; local or fsspec URL) or a hub id.")
    output: str = Field(description="Where results go: a local path or fsspec URL.")
    prior_cache: Optional[str] = Field(None, description="Class-prior cache shared across runs (default <output>/_priors).")
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-protocol fsspec options, e.g. s3: {endpoint_url: ...}. No secrets here."
    )
    output_dtype: Literal["fp32", "fp16"] = Field("fp32", description="Precision of the saved model weights.")
    base_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Precision the frozen base model is held in (every component): bf16 halves its memory, "
        "what FLUX.1-dev on one 80 GB card and SDXL on 24 GB need. LoRA only: the adapters train in float32 beside it; "
        "full fine-tuning needs fp32. Part of the base model's identity (priors cache, checkpoints).")
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
    flux: Optional[FluxSettings] = None  # the FLUX.1 section, likewise
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


def format_prompt(template: str, token: str, class_noun: str) -> str:
    return template.format(token=token, class_noun=class_noun)


def where_of(m: Manifest, i: int) -> str:
    """How error lines name subject i: `subjects[k]`, or `subjects[k](<variant id>)` for a sweep's variant."""
    s = m.subjects[i]
    return source_of(m, i) + (f"({s.id})" if s._sweep_of is not None else "")


def source_of(m: Manifest, i: int) -> str:
    """`subjects[k]` as the manifest file numbers it (a sweep's variants all come from one entry)."""
    s = m.subjects[i]
    return f"subjects[{i if s._source is None else s._source}]"


def json_schema() -> dict[str, Any]:
    return Manifest.model_json_schema()
