"""The built-in architectures (`builtin:<name>`): fixed configs of each family, weights from a fixed seed."""

from __future__ import annotations

from typing import Any

from dbbatch.core.errors import ModelError
from dbbatch.models.assets import PRETRAINED

BUILTIN_VERSION = "2"  # bump when a built-in config or its seed changes: it is part of every cache key
BUILTIN_SEED = 1234

# Scheduler as shipped with SD 1.x checkpoints; DDIM is used for sampling, DDPM (same betas) for training.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}

# FLUX.1-dev's flow-matching scheduler (schnell's: shift 1, no dynamic shifting).
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                 "shift": 1.0, "use_dynamic_shifting": False}

# Built-in architectures (random weights, fixed seed), each of a family (dbbatch/models/families/). tiny-sd: CI-sized,
# native 64 px. small-sd: about 10x the parameters, native 128 px, still CPU-friendly. sd15: the full SD 1.5
# shapes, for GPU benchmarks. tiny-sdxl: SDXL-shaped (two text encoders, the second with a projection, the
# text_time added embedding), CI-sized, native 64 px. sdxl: the full SDXL 1.0 base shapes, for GPU benchmarks.
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32)
_TINY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# FLUX.1's VAE: 16 latent channels without quant convs, latents shifted then scaled; tiny-flux's has 4 (16 packed
# channels) and the same 8x scale factor, so resolutions are multiples of 16 as for the real model.
_FLUX_VAE = dict(in_channels=3, out_channels=3, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.1159, scaling_factor=0.3611)
_TINY_FLUX = {
    "family": "flux",
    # as diffusers' own Flux tests: one double and one single block, 2 heads of 16, rope axes [4, 4, 8]
    "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(4, 4, 8)),
    "vae": dict(_FLUX_VAE, block_out_channels=(16, 16, 16, 16), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "text_encoder": _TINY_CLIP,
    "text_encoder_2": dict(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                           feed_forward_proj="gated-gelu"),
    "scheduler": FLUX_SCHEDULER_CONFIG,
}
ARCHS: dict[str, dict[str, Any]] = {
    "tiny-sd": {
        "family": "sd",
        "unet": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
    },
    # ~10x tiny-sd per component (UNet 16.5M, VAE 6.7M, text encoder 15.8M; 39M in all vs 3.7M), native 128 px
    # with a 4x VAE, so the UNet works on the same 32x32 latents as tiny-sd at 64 px: about 5x its FLOPs per step.
    "small-sd": {
        "family": "sd",
        "unet": dict(block_out_channels=(64, 128, 192), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=256, attention_head_dim=8),
        "vae": dict(block_out_channels=(64, 128, 192), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        "text_encoder": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                             projection_dim=256),
    },
    "sd15": {
        "family": "sd",
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                     out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3, latent_channels=4,
                    sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
    },
    # The UNet's cross-attention width is the two encoders' widths side by side (32 + 32); its added embedding
    # takes the pooled projection (32) and six micro-conditioning ids of addition_time_embed_dim (6 x 8).
    "tiny-sdxl": {
        "family": "sdxl",
        "unet": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                     transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=32 + 6 * 8,
                     cross_attention_dim=64),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": _TINY_CLIP,
    },
    # SDXL 1.0 base: 2.6B-parameter UNet, CLIP ViT-L + OpenCLIP ViT-bigG, native 1024 px (GPU benchmarks).
    "sdxl": {
        "family": "sdxl",
        "unet": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                     out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                     projection_class_embeddings_input_dim=2816, cross_attention_dim=2048),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3,
                    latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
        "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                               projection_dim=1280, hidden_act="gelu"),
    },
    # FLUX.1-shaped, CI-sized: guidance-distilled like FLUX.1-dev, native 64 px; and its schnell twin (no guidance
    # embedding, schnell's scheduler)
    "tiny-flux": _TINY_FLUX,
    "tiny-flux-schnell": {**_TINY_FLUX, "transformer": {**_TINY_FLUX["transformer"], "guidance_embeds": False},
                          "scheduler": FLUX_SCHNELL_SCHEDULER_CONFIG},
    # FLUX.1-dev: the 12B transformer (19 double, 38 single blocks), CLIP ViT-L, T5 v1.1 XXL, 1024 px (GPU benchmarks)
    "flux": {
        "family": "flux",
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "vae": dict(_FLUX_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                    sample_size=1024, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
        "text_encoder_2": dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
        "scheduler": FLUX_SCHEDULER_CONFIG,
    },
}


def builtin_family(name: str) -> Any:
    """The family of a `builtin:` name (pretrained ones: their folder's)."""
    from dbbatch.models import families

    if name in PRETRAINED:
        return families.of_folder(PRETRAINED[name], f"builtin:{name}")
    if name not in ARCHS:
        raise unknown_builtin(name)
    return families.by_name(ARCHS[name]["family"])


def builtin_names() -> list[str]:
    """Every `builtin:` name a manifest may give: random-weight architectures, then pretrained models."""
    return [*ARCHS, *PRETRAINED]


def unknown_builtin(name: str) -> ModelError:
    return ModelError(f"unknown built-in model 'builtin:{name}'; available: {', '.join('builtin:' + a for a in builtin_names())}")


def build_builtin(name: str, torch_dtype: Any = None) -> dict[str, Any]:
    """Components of a built-in architecture with weights from a fixed seed (in memory, nothing on disk), plus
    its `family`."""
    from dbbatch.models import families

    if name not in ARCHS:
        raise unknown_builtin(name)
    arch = ARCHS[name]
    family = families.by_name(arch["family"])
    comps = family.build(arch, BUILTIN_SEED)
    comps.update(scheduler=family.sampling_scheduler(arch.get("scheduler", SCHEDULER_CONFIG)), family=family)
    if torch_dtype is not None:
        for k in (family.denoiser, "vae", *family.text_encoders):
            comps[k].to(torch_dtype)
    return comps
