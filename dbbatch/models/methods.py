"""What trains, per `train.method`, and putting the base model back between subjects.

- full: the UNet's weights (and the text encoders' with train_text_encoder) are unfrozen and trained in
  place; the base weights are snapshotted to host memory before the first such subject and restored after.
- lora: adapters are attached to the frozen base (lora.py); afterwards they are removed, and the base
  weights, never trained, need no restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Trainable:
    parameters: int  # trainable parameter count (metrics.json)
    text_encoders: tuple[str, ...]  # the text encoders that (or whose adapters) train: prompts go in as token ids
    adapters_only: bool  # checkpoints hold only the trainable parameters


def text_encoders_trained(model: Any, subject: Any) -> tuple[str, ...]:
    """The text encoders a subject trains (or puts adapters on): none, or the family's choice (SDXL: the first,
    and the second with sdxl.train_text_encoder_2)."""
    train = subject.train
    on = train.lora.text_encoder if train.method == "lora" else train.train_text_encoder
    return model.family.trained_text_encoders(model.family.settings_of(subject)) if on else ()


def make_trainable(model: Any, subject: Any) -> Trainable:
    """Make the parts of `model` that the subject's `train` section trains trainable, in training mode."""
    train = subject.train
    text = text_encoders_trained(model, subject)
    if train.method == "lora":
        from dbbatch.models.lora import attach

        count = attach(model, train.lora, train.seed, subject.id, text)
    else:
        model.snapshot((model.family.denoiser, *text))  # the base weights, to restore once this subject is done (first time only)
        parts = [model.denoiser] + [getattr(model, name) for name in text]
        for part in parts:
            part.requires_grad_(True)
        count = sum(p.numel() for part in parts for p in part.parameters())
    model.denoiser.train()
    for name in text:
        getattr(model, name).train()
    return Trainable(count, text, train.method == "lora")


def reset(model: Any) -> None:
    """The base model as loaded: adapters removed, weights a full fine-tune changed restored, all frozen."""
    from dbbatch.models.lora import detach

    detach(model)
    model.restore()
    model.freeze()


def trained_weights(model: Any) -> dict[str, Any]:
    """A host-memory copy of every trainable parameter of `model` ("unet.<name>" or "transformer.<name>", "text_encoder.<name>", ...):
    the weights of one step, for evaluation.keep: best."""
    return {f"{part}.{name}": p.detach().cpu().clone() for part in model.trainable_parts
            for name, p in getattr(model, part).named_parameters() if p.requires_grad}


def load_weights(model: Any, weights: dict[str, Any]) -> None:
    """Put `trained_weights`' copy back into the same parameters."""
    import torch

    with torch.no_grad():
        for key, value in weights.items():
            part, name = key.split(".", 1)
            getattr(model, part).get_parameter(name).copy_(value)
