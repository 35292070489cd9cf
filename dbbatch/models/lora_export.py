"""The files of a LoRA subject in `<output>/<subject>/lora/`, in the formats serving stacks load.

- `pytorch_lora_weights.safetensors`: diffusers' format, written by diffusers' own `save_lora_weights` (with
  the adapter config in its metadata, so alpha != rank loads right); `pipe.load_lora_weights(folder)`.
- `<subject>.safetensors`: the kohya format that AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load
  (`lora_unet_<layer>` and the family's text-encoder prefixes, `lora_te_` for SD 1.x/2.x, `lora_te1_` and
  `lora_te2_` for SDXL, with `.lora_down.weight`, `.lora_up.weight`, `.alpha`), made by diffusers'
  `convert_state_dict_to_kohya` with two corrections: the alpha tensors carry our alpha (the converter writes
  alpha = rank), and each text encoder gets its family's prefix (the converter names SDXL's two), with the
  `text_model.` level of the HF CLIP layout that transformers 5 dropped.
- `README.md` (+ `grid.png`): a Hugging Face model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dbbatch.models.lora import ADAPTER, adapter_state

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def kohya_name(subject_id: str) -> str:
    return f"{subject_id}.safetensors"


def _clip_layout(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


# the prefix diffusers' converter gives each text encoder's keys
CONVERTER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_state(unet_state: dict[str, Any], text_states: dict[str, dict[str, Any]], alpha: float,
                prefixes: dict[str, str]) -> dict[str, Any]:
    """peft adapter states (the UNet's, and each text encoder's by component name) -> kohya keys and tensors,
    each text encoder under its family's prefix in `prefixes` (pure)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    both = {f"unet.{k}": v for k, v in unet_state.items()}
    for name, state in text_states.items():
        both.update({f"{name}.{_clip_layout(k)}": v for k, v in state.items()})
    renamed = {CONVERTER_PREFIXES[name]: prefixes[name] for name in text_states}
    out = {}
    for key, value in convert_state_dict_to_kohya(both).items():
        for old, new in renamed.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))
        out[key] = value.contiguous()
    return out


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
    known = model.family.kohya_version(model)
    if known:
        meta["ss_base_model_version"], meta["modelspec.architecture"] = known
    return meta


def write_lora_folder(model: Any, subject: Any, out_dir: Path, steps: int, dtype: Any, resolution: int) -> Path:
    """Write both weight files of the adapters now attached to `model` into `out_dir`."""
    import diffusers
    from safetensors.torch import save_file

    from dbbatch.models.methods import text_encoders_trained

    out_dir.mkdir(parents=True, exist_ok=True)

    def cast(state: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}

    family = model.family
    denoiser_state = cast(adapter_state(model.denoiser))
    te_states = {name: cast(adapter_state(getattr(model, name))) for name in text_encoders_trained(model, subject)}
    te_config = _in_order(_te_config(subject))
    # the family's pipeline class writes its own file layout (SDXL: text_encoder_2_lora_layers beside the first;
    # FLUX.1: transformer_lora_layers)
    layers = {f"{name}_lora_layers": state for name, state in te_states.items()}
    configs = {f"{name}_lora_adapter_metadata": te_config for name in te_states}
    layers[f"{family.denoiser}_lora_layers"] = denoiser_state
    configs[f"{family.denoiser}_lora_adapter_metadata"] = _in_order(model.denoiser.peft_config[ADAPTER].to_dict())
    getattr(diffusers, family.pipeline_class).save_lora_weights(
        str(out_dir), weight_name=DIFFUSERS_FILE, safe_serialization=True, **layers, **configs)
    save_file(family.kohya_state(model.denoiser, denoiser_state, te_states, subject.train.lora.alpha),
              str(out_dir / kohya_name(subject.id)), metadata=kohya_metadata(subject, model, steps, resolution))
    return out_dir


def _in_order(config: dict[str, Any]) -> dict[str, Any]:
    """peft's config with its sets (target_modules) as sorted lists: the same file bytes in every process (a set's
    order follows the process's string hashing)."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def _te_config(subject: Any) -> dict[str, Any]:
    from peft import LoraConfig

    from dbbatch.models.lora import TEXT_ENCODER_TARGETS

    lora = subject.train.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(TEXT_ENCODER_TARGETS)).to_dict()


def load_lora_folder(model: Any, folder: Path) -> None:
    """Attach the adapters stored in `folder` (the diffusers file) to `model`, as a user's pipeline does."""
    import logging

    # diffusers warns "No LoRA keys associated to CLIPTextModel" for every adapter without a text-encoder part
    quiet = logging.getLogger("diffusers.loaders.lora_base")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model.pipeline().load_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER)
    finally:
        quiet.setLevel(level)


def model_card(subject: Any, model: Any, steps: int, files: dict[str, int], grid: Optional[str],
               evaluation: Optional[dict[str, Any]] = None, resolution: Optional[int] = None) -> str:
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
    # the call that renders as the subject's samples did: its guidance, and the family's own inputs (SDXL's sizes)
    options = model.family.render_options(model.family.settings_of(subject), resolution or 0, subject.samples.negative_prompt)
    call = "".join(f", {k}={v!r}" for k, v in options.items() if v is not None and v != "" and resolution)
    call = f", guidance_scale={subject.samples.guidance_scale:g}{call}"
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
from diffusers import {model.family.pipeline_class}
pipe = {model.family.pipeline_class}.from_pretrained("<the base model>")
pipe.load_lora_weights("<this folder>")  # {DIFFUSERS_FILE}
image = pipe("{subject.instance_prompt}"{call}).images[0]
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
