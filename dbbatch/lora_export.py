"""The files of a LoRA subject in `<output>/<subject>/lora/`, in the formats serving stacks load.

- `pytorch_lora_weights.safetensors`: diffusers' format, written by diffusers' own `save_lora_weights` (with
  the adapter config in its metadata, so alpha != rank loads right); `pipe.load_lora_weights(folder)`.
- `<subject>.safetensors`: the kohya format that AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load
  (`lora_unet_<layer>` / `lora_te_<layer>` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`), made by
  diffusers' `convert_state_dict_to_kohya` with two corrections: the alpha tensors carry our alpha (the
  converter writes alpha = rank), and SD 1.x/2.x's one text encoder is `lora_te_` (the converter's `lora_te1_`
  is SDXL's first encoder), with the `text_model.` level of the HF CLIP layout that transformers 5 dropped.
- `README.md` (+ `grid.png`): a Hugging Face model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dbbatch.lora import ADAPTER, adapter_state

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def kohya_name(subject_id: str) -> str:
    return f"{subject_id}.safetensors"


def _clip_layout(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


def kohya_state(unet_state: dict[str, Any], text_state: dict[str, Any], alpha: float) -> dict[str, Any]:
    """peft adapter states -> kohya keys and tensors (pure)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    both = {f"unet.{k}": v for k, v in unet_state.items()}
    both.update({f"text_encoder.{_clip_layout(k)}": v for k, v in text_state.items()})
    out = {}
    for key, value in convert_state_dict_to_kohya(both).items():
        if key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))
        out[key] = value.contiguous()
    return out


def base_model_version(model: Any) -> Optional[str]:
    """kohya's `ss_base_model_version` for SD 1.x (CLIP width 768) and 2.x (1024); None for other models."""
    width = getattr(model.text_encoder.config, "hidden_size", None)
    return {768: "sd_v1", 1024: "sd_v2"}.get(width)


def kohya_metadata(subject: Any, model: Any, steps: int, resolution: int) -> dict[str, str]:
    """Safetensors metadata of the kohya file: kohya's `ss_*` keys (A1111 shows them) and ours."""
    lora = subject.train.lora
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank), "ss_network_alpha": f"{lora.alpha:g}",
        "ss_output_name": subject.id, "ss_sd_model_name": model.source, "ss_steps": str(steps),
        "ss_learning_rate": f"{subject.train.learning_rate:g}", "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": json.dumps({subject.id: {subject.token: 1, subject.class_noun: 1}}),
        "ss_training_comment": f"dbbatch DreamBooth LoRA of {subject.id}: trigger prompt {subject.instance_prompt!r}",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.title": subject.id,
        "modelspec.trigger_phrase": subject.instance_prompt,
        "dbbatch.base_model": model.source, "dbbatch.base_model_identity": model.identity,
        "dbbatch.token": subject.token, "dbbatch.class_noun": subject.class_noun,
        "dbbatch.trigger_prompt": subject.instance_prompt, "dbbatch.rank": str(lora.rank),
        "dbbatch.alpha": f"{lora.alpha:g}", "dbbatch.target": json.dumps(lora.target),
        "dbbatch.text_encoder": json.dumps(lora.text_encoder),
    }
    version = base_model_version(model)
    if version:
        meta["ss_base_model_version"] = version
        meta["modelspec.architecture"] = {"sd_v1": "stable-diffusion-v1/lora", "sd_v2": "stable-diffusion-v2-768-v/lora"}[version]
    return meta


def write_lora_folder(model: Any, subject: Any, out_dir: Path, steps: int, dtype: Any, resolution: int) -> Path:
    """Write both weight files of the adapters now attached to `model` into `out_dir`."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with_te = subject.train.lora.text_encoder

    def cast(state: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}

    unet_state = cast(adapter_state(model.unet))
    te_state = cast(adapter_state(model.text_encoder)) if with_te else {}
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state if with_te else None,
        unet_lora_adapter_metadata=_in_order(model.unet.peft_config[ADAPTER].to_dict()),
        text_encoder_lora_adapter_metadata=_in_order(_te_config(model, subject)) if with_te else None,
        weight_name=DIFFUSERS_FILE, safe_serialization=True)
    save_file(kohya_state(unet_state, te_state, subject.train.lora.alpha), str(out_dir / kohya_name(subject.id)),
              metadata=kohya_metadata(subject, model, steps, resolution))
    return out_dir


def _in_order(config: dict[str, Any]) -> dict[str, Any]:
    """peft's config with its sets (target_modules) as sorted lists: the same file bytes in every process (a set's
    order follows the process's string hashing)."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def _te_config(model: Any, subject: Any) -> dict[str, Any]:
    from peft import LoraConfig

    from dbbatch.lora import TEXT_ENCODER_TARGETS

    lora = subject.train.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(TEXT_ENCODER_TARGETS)).to_dict()


def pipeline_of(model: Any) -> Any:
    """A StableDiffusionPipeline over the model's own modules (no copies): loading LoRA weights into it
    loads them into the model."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_lora_folder(model: Any, folder: Path) -> None:
    """Attach the adapters stored in `folder` (the diffusers file) to `model`, as a user's pipeline does."""
    import logging

    # diffusers warns "No LoRA keys associated to CLIPTextModel" for every adapter without a text-encoder part
    quiet = logging.getLogger("diffusers.loaders.lora_base")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        pipeline_of(model).load_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER)
    finally:
        quiet.setLevel(level)


def model_card(subject: Any, model: Any, steps: int, files: dict[str, int], grid: Optional[str],
               evaluation: Optional[dict[str, Any]] = None) -> str:
    """README.md of the lora/ folder, with the Hub's YAML header (pure). `evaluation`: metrics.json's, whose
    published step's scores (and the base model's) the card lists."""
    lora = subject.train.lora
    kohya = kohya_name(subject.id)
    header = {
        "base_model": model.source, "library_name": "diffusers", "license": "other",
        "tags": ["text-to-image", "diffusers", "lora", "dreambooth", "dbbatch", "template:sd-lora"],
        "instance_prompt": subject.instance_prompt,
    }
    if grid:
        header["widget"] = [{"text": subject.instance_prompt, "output": {"url": grid}}]
    import yaml

    rows = [("Base model", f"`{model.source}` (identity `{model.identity}`)"), ("Token", f"`{subject.token}`"),
            ("Class", f"`{subject.class_noun}`"), ("Trigger prompt", f"`{subject.instance_prompt}`"),
            ("Rank / alpha", f"{lora.rank} / {lora.alpha:g}"), ("Layers", f"`{json.dumps(lora.target)}`"
                                                                        + (" + text encoder attention" if lora.text_encoder else "")),
            ("Steps", str(steps)), ("Learning rate", f"{subject.train.learning_rate:g}"),
            ("Prior preservation", _prior_text(subject))]
    if evaluation and evaluation.get("published"):
        at, base = evaluation["published"], evaluation.get("baseline") or {}
        scores = ", ".join(f"{m} {v:.3f}" + (f" (base {base[m]:.3f})" if base.get(m) is not None else "")
                           for m, v in at.items() if m in ("dino", "clip_i", "clip_t", "class_drift", "pres") and v is not None)
        rows.append((f"Scores at step {evaluation.get('published_step')}", scores + (
            f"; flagged: {'; '.join(evaluation['flags'])}" if evaluation.get("flags") else "")))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    sizes = "\n".join(f"- `{name}`: {size / 1e6:.2f} MB" for name, size in sorted(files.items()))
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {subject.id}: DreamBooth LoRA

A LoRA adapter of `{model.source}`, trained by dbbatch with DreamBooth on photos of one {subject.class_noun}.
Prompt with `{subject.instance_prompt}`.

| Setting | Value |
| --- | --- |
{table}

{f"![samples]({grid})" if grid else ""}

## Files
{sizes}

## diffusers
```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("<the base model>")
pipe.load_lora_weights("<this folder>")  # {DIFFUSERS_FILE}
image = pipe("{subject.instance_prompt}").images[0]
```

## AUTOMATIC1111, ComfyUI
Copy `{kohya}` into `models/Lora/` (A1111) or `models/loras/` (ComfyUI). In A1111 prompt
`<lora:{subject.id}:1> {subject.instance_prompt}`; in ComfyUI load it with a LoraLoader node.
"""


def _prior_text(subject: Any) -> str:
    if not subject.train.with_prior_preservation:
        return "off"
    if subject.priors.source == "base_model":
        return f"the base model's own prediction for `{subject.class_prompt}` (weight {subject.train.prior_loss_weight:g})"
    return f"{subject.priors.num_images} class images of `{subject.class_prompt}` (weight {subject.train.prior_loss_weight:g})"
