"""K subjects' LoRA adapters stacked in one layer per adapted module (`train.method: lora` with packing).

A packed layer wraps a frozen Linear and holds the K adapters as two parameters, `A: K x r x in` and
`B: K x out x r`. Its input is subject-major (the first batch/K examples are subject 0's, and so on), and it adds
`scale * B_k @ A_k @ x` to each subject's examples with two batched matmuls, so the number of kernels per step
does not depend on K. (peft's mixed-adapter forward loops over the adapters inside every layer and is for
inference: the tests use it as the reference.)

Slot k starts as exactly the adapter peft would make for subject k alone (the same seed, the same init),
and `slot_state(k)` gives it back in peft's own key names, so a packed subject is exported by the same writers
as a solo one (lora_export.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from dbbatch.core.errors import InputError

PACKED_ATTR = "_dbbatch_packed"  # on the UNet: {layer name: PackedLoraLinear}


class PackedLoraLinear(torch.nn.Module):
    """`base(x) + scale * B_k A_k dropout(x)` for the k-th of K equal, consecutive slices of the batch."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(a.to(base.weight.device, torch.float32).contiguous())  # K x r x in
        self.B = torch.nn.Parameter(b.to(base.weight.device, torch.float32).contiguous())  # K x out x r
        self.scale, self.dropout, self.enabled = scale, dropout, True
        self.only: int | None = None  # set: slot `only` applies to the whole batch (rendering one subject)

    @property
    def slots(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        if self.only is not None:
            a, b = self.A[self.only], self.B[self.only]
            return y + (self.scale * (x.to(a.dtype) @ a.T @ b.T)).to(y.dtype)
        k = self.slots
        if x.shape[0] % k:
            raise RuntimeError(f"a packed LoRA layer of {k} subjects got a batch of {x.shape[0]}")
        h = x.reshape(k, -1, x.shape[-1]).to(self.A.dtype)  # K x (examples x tokens) x in
        if self.dropout and self.training:
            h = torch.nn.functional.dropout(h, self.dropout)  # its own mask for every subject's every element
        h = torch.bmm(torch.bmm(h, self.A.transpose(1, 2)), self.B.transpose(1, 2))  # K x M x out
        return y + (self.scale * h).reshape(y.shape).to(y.dtype)


def _parent(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def packable_problem(layers: dict[str, Any]) -> str | None:
    """Why these target layers cannot be packed (None: they can): packed layers wrap Linear layers only."""
    convs = [n for n, m in layers.items() if not isinstance(m, torch.nn.Linear)]
    if convs:
        return f"packed training adapts linear layers only, and the target includes {convs[0]} ({type(layers[convs[0]]).__name__})"
    return None


def attach_packed(unet: torch.nn.Module, initial: list[dict[str, torch.Tensor]], names: list[str], rank: int,
                  alpha: float, dropout: float) -> int:
    """Replace each target Linear of `unet` by a packed layer whose slot k starts as `initial[k]` (peft's state
    of subject k's fresh adapter: `<name>.lora_A.weight`, `<name>.lora_B.weight`). Returns the trainable
    parameter count per subject."""
    if getattr(unet, PACKED_ATTR, None):
        raise RuntimeError("the UNet already holds packed adapters")
    layers = {n: unet.get_submodule(n) for n in names}
    if problem := packable_problem(layers):
        raise InputError(problem)
    packed: dict[str, PackedLoraLinear] = {}
    for name, base in layers.items():
        a = torch.stack([state[f"{name}.lora_A.weight"] for state in initial])
        b = torch.stack([state[f"{name}.lora_B.weight"] for state in initial])
        layer = PackedLoraLinear(base, a, b, alpha / rank, dropout)
        parent, child = _parent(unet, name)
        setattr(parent, child, layer)
        packed[name] = layer
    setattr(unet, PACKED_ATTR, packed)
    return sum(p[0].numel() for layer in packed.values() for p in (layer.A, layer.B))


def packed_layers(unet: torch.nn.Module) -> dict[str, PackedLoraLinear]:
    return getattr(unet, PACKED_ATTR, None) or {}


def detach_packed(unet: torch.nn.Module) -> bool:
    """Put the original Linear layers back. True if there were packed layers."""
    packed = packed_layers(unet)
    for name, layer in packed.items():
        parent, child = _parent(unet, name)
        setattr(parent, child, layer.base)
    if hasattr(unet, PACKED_ATTR):
        delattr(unet, PACKED_ATTR)
    return bool(packed)


def parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The stacked parameters, in a fixed order (layer name, then A before B)."""
    return [p for _, layer in sorted(packed_layers(unet).items()) for p in (layer.A, layer.B)]


def slot_state(unet: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Subject k's adapter in peft's key names, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(packed_layers(unet).items()):
        out[f"{name}.lora_A.weight"] = layer.A.detach()[k].cpu().clone()
        out[f"{name}.lora_B.weight"] = layer.B.detach()[k].cpu().clone()
    return out


def packed_off(unet: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """The frozen base model inside: every packed layer passes its input through its base layer only."""
    return _every_layer(unet, enabled=False)


def only_slot(unet: torch.nn.Module, k: int) -> contextlib.AbstractContextManager[None]:
    """Subject k's model inside (rendering it for evaluation): every packed layer applies slot k's adapter to
    its whole input."""
    return _every_layer(unet, only=k)


@contextlib.contextmanager
def _every_layer(unet: torch.nn.Module, **state: Any) -> Iterator[None]:
    layers = list(packed_layers(unet).values())
    before = [{key: getattr(layer, key) for key in state} for layer in layers]
    for layer in layers:
        for key, value in state.items():
            setattr(layer, key, value)
    try:
        yield
    finally:
        for layer, saved in zip(layers, before):
            for key, value in saved.items():
                setattr(layer, key, value)
