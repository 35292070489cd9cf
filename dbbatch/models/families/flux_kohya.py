"""FLUX.1 LoRA in the kohya / ComfyUI layout (pure): Black Forest Labs' module names, fused projections.

kohya's sd-scripts (and ComfyUI, Forge) name a Flux LoRA after BFL's modules: `lora_unet_double_blocks_<i>_...`,
`lora_unet_single_blocks_<i>_...`, where one BFL linear holds several of diffusers' (a double block's img/txt
attention `qkv` is diffusers' to_q, to_k, to_v; a single block's `linear1` is to_q, to_k, to_v and proj_mlp).
A fused layer's adapter is the diffusers adapters side by side: the down matrices stacked (rank n*r for n
adapted parts), the up matrix block-diagonal (each part's rows hold only its own block), and alpha n*alpha so
that kohya's scale alpha'/rank' is ours, alpha/r. A part that is not adapted has zero rows. diffusers' own
kohya-Flux converter (`FluxPipeline.load_lora_weights` on this file) reads the block structure back.
"""

from __future__ import annotations

from typing import Any

# BFL name (after the block prefix) -> the diffusers layers it fuses, in their order along the output
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation_lin": ("norm.linear",)}
OUTSIDE = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}
SWAPPED = {"norm_out.linear"}  # BFL orders this modulation (scale, shift); diffusers (shift, scale)


def bfl_groups(layers: list[str]) -> dict[str, tuple[str, ...]]:
    """kohya name -> the diffusers layers it fuses, for every fused group of the denoiser's `layers`."""
    blocks = {n.split(".")[1] for n in layers if n.startswith("transformer_blocks.")}
    singles = {n.split(".")[1] for n in layers if n.startswith("single_transformer_blocks.")}
    out = {f"lora_unet_double_blocks_{i}_{bfl}": tuple(f"transformer_blocks.{i}.{p}" for p in parts)
           for i in sorted(blocks, key=int) for bfl, parts in DOUBLE.items()}
    out.update({f"lora_unet_single_blocks_{i}_{bfl}": tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
                for i in sorted(singles, key=int) for bfl, parts in SINGLE.items()})
    out.update({f"lora_unet_{bfl}": (layer,) for bfl, layer in OUTSIDE.items()})
    return out


def kohya_flux_state(state: dict[str, Any], out_features: dict[str, int], alpha: float) -> dict[str, Any]:
    """peft adapter state of the transformer (`<layer>.lora_A.weight`, `.lora_B.weight`) -> kohya tensors.
    `out_features`: each Linear's output width (a fused part without an adapter still has its rows)."""
    import torch

    adapted = {k.rsplit(".lora_A.weight", 1)[0] for k in state if k.endswith(".lora_A.weight")}
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, parts in bfl_groups(list(out_features)).items():
        present = [p for p in parts if p in adapted]
        if not present:
            continue
        downs = [state[f"{p}.lora_A.weight"] for p in present]
        r = downs[0].shape[0]
        up = torch.zeros(sum(out_features[p] for p in parts), r * len(present), dtype=downs[0].dtype)
        row = 0
        for p in parts:
            if p in present:
                k = present.index(p)
                b = state[f"{p}.lora_B.weight"]
                if p in SWAPPED:
                    shift, scale = b.chunk(2, dim=0)
                    b = torch.cat([scale, shift])
                up[row : row + out_features[p], k * r : (k + 1) * r] = b
            row += out_features[p]
        out[f"{name}.lora_down.weight"] = torch.cat(downs).contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(present))
        used.update(present)
    unnamed = sorted(adapted - used)
    if unnamed:
        from dbbatch.core.errors import ModelError

        raise ModelError(f"the kohya Flux layout has no name for the adapted layer {unnamed[0]!r}; choose "
                         "train.lora.target layers inside the transformer's blocks")
    return out

