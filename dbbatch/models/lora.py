"""LoRA adapters on the frozen base model (`train.method: lora`): which layers get one, attaching and removing
them between subjects, switching them off for the base model's own prediction, and their state.

The adapters are peft LoRA layers (`add_adapter` on the diffusers UNet, `inject_adapter_in_model` on the text
encoder). The base weights never change: a subject ends by removing its adapters (`detach`), which puts the
original modules back, instead of restoring a snapshot of the base weights. The files a serving stack loads
are written by `lora_export.py`.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Iterable, Iterator, Optional, Union

from dbbatch.core.errors import InputError

ADAPTER = "default"
# A preset names layers by their tails; a denoiser lacks some (the UNets have no joint-attention context
# projections): those are skipped. FLUX.1's double blocks attend jointly over image and text: the context
# stream's projections (add_q_proj, add_k_proj, add_v_proj, to_add_out) are attention too, as diffusers' Flux
# trainer targets them; its single blocks have to_q/to_k/to_v (their output is the fused proj_out).
_JOINT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0", *_JOINT),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", *_JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"),
}
ALL_LINEAR_CONV_UNDER = ("down_blocks.", "mid_block.", "up_blocks.")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# -- pure: which layers -------------------------------------------------------------------------------------
def adaptable_layers(module: Any) -> list[str]:
    """Names of the layers of `module` that can hold a LoRA adapter (Linear and Conv2d)."""
    import torch

    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n]


def _matches(name: str, pattern: str) -> bool:
    """A module-name pattern matches a layer's full name, or its dotted tail (`attn2.to_k` matches
    `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`); `*` and `?` work as in globs."""
    if name == pattern or name.endswith("." + pattern):
        return True
    return any(c in pattern for c in "*?[") and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def resolve_targets(layers: Iterable[str], target: Union[str, list[str]]) -> tuple[list[str], list[str]]:
    """(the layer names `target` selects, the patterns of `target` that match no layer)."""
    layers = list(layers)
    if target == "all-linear+conv":
        return [n for n in layers if n.startswith(ALL_LINEAR_CONV_UNDER)], []
    patterns = PRESETS[target] if isinstance(target, str) else tuple(target)
    chosen = [n for n in layers if any(_matches(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in layers)]
    if isinstance(target, str):
        unmatched = [] if chosen else list(patterns)  # a preset names what SD UNets have; some may lack a part
    return chosen, unmatched


def target_problem(field: str, layers: Iterable[str], target: Union[str, list[str]]) -> Optional[str]:
    """The manifest error for a `train.lora.target` that matches nothing (or has a pattern that does not), or None."""
    layers = list(layers)
    chosen, unmatched = resolve_targets(layers, target)
    if not unmatched and chosen:
        return None
    from dbbatch.config.manifest_errors import closest

    tails = sorted({n.rsplit(".", 1)[-1] for n in layers} | {".".join(n.split(".")[-2:]) for n in layers})
    what = f"pattern {unmatched[0]!r}" if unmatched else f"preset {target!r}"
    hint = closest(unmatched[0], tails) if unmatched else None
    return (f"{field}: {what} matches no layer of the base model's UNet"
            f"{f'; did you mean {hint!r}?' if hint else ''} (layer names end in e.g. to_q, to_out.0, ff.net.2, proj_in, "
            "conv1; presets: attention, attention+ff, all-linear+conv)")


# -- attaching and removing ---------------------------------------------------------------------------------
def attach(model: Any, lora: Any, seed: int, subject_id: str, text_encoders: tuple[str, ...] = ()) -> int:
    """Add fresh adapters (settings `lora`, a manifest LoraSettings) to the model's UNet, and to the named
    `text_encoders` (methods.text_encoders_trained); the adapters' initial values depend on `seed` only.
    Returns the number of trainable parameters. Everything else stays frozen."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    layers = adaptable_layers(model.denoiser)
    names, unmatched = resolve_targets(layers, lora.target)
    if unmatched or not names:
        raise InputError(target_problem(f"subject {subject_id}: train.lora.target", layers, lora.target) or "")
    init: Any = "gaussian" if lora.init == "gaussian" else True

    def config(targets: list[str]) -> Any:
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, init_lora_weights=init,
                          target_modules=targets)

    model.freeze()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.denoiser.add_adapter(config(names), adapter_name=ADAPTER)
        for name in text_encoders:
            encoder = getattr(model, name)
            te_names, _ = resolve_targets(adaptable_layers(encoder), list(TEXT_ENCODER_TARGETS))
            inject_adapter_in_model(config(te_names), encoder, adapter_name=ADAPTER)
    modules = [model.denoiser] + [getattr(model, name) for name in text_encoders]
    # adapters live where their layer does (the model is on its device already), in float32 also beside a bf16
    # or fp16 base (manifest base_dtype): their updates and optimizer state need it; peft casts the input
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in trainable:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return sum(p.numel() for p in trainable)


def attached(module: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def detach(model: Any) -> bool:
    """Remove every LoRA layer from the UNet and the text encoders: the original modules (and the base weights,
    never trained) are back. True if there was anything to remove."""
    from diffusers.utils import recurse_remove_peft_layers

    found = False
    for module in (model.denoiser, *model.text_encoders):
        if attached(module):
            found = True
            recurse_remove_peft_layers(module)
        _forget_adapters(module)
    return found


def _forget_adapters(module: Any) -> None:
    """Drop the adapter bookkeeping diffusers/transformers keep on a model, so a new adapter can be added."""
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", None):
        module._hf_peft_config_loaded = None


@contextlib.contextmanager
def adapters_off(*modules: Optional[Any]) -> Iterator[None]:
    """The base model inside: every LoRA layer of `modules` passes its input through its frozen layer only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules if module is not None for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_state(module: Any) -> dict[str, Any]:
    """The adapters of `module` as peft saves them (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def load_adapter_state(module: Any, state: dict[str, Any]) -> None:
    """Copy adapter weights in peft's saved names (`adapter_state`) into the attached adapter of `module`."""
    import torch

    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            layer, _, part = key.rpartition(".lora_")  # "<layer>.lora_A.weight" -> "<layer>.lora_A.default.weight"
            name = f"{layer}.lora_{part.replace('.weight', f'.{ADAPTER}.weight')}"
            if name not in params:
                raise RuntimeError(f"adapter weight {key} has no place in the model ({name})")
            params[name].copy_(value.to(params[name].dtype))


def merged_copy(module: Any) -> Any:
    """A plain copy of `module` with its adapters merged into the weights (W + alpha/r B A); `module` itself
    keeps its adapters and its base weights unchanged. Costs one copy of the module, once per export."""
    import copy

    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    clone = copy.deepcopy(module)
    for layer in clone.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    recurse_remove_peft_layers(clone)
    _forget_adapters(clone)
    return clone
