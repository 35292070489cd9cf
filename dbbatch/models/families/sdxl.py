"""Stable Diffusion XL: two CLIP text encoders (the second with a projection), their penultimate hidden states
concatenated; the second's pooled projection and the micro-conditioning ids (original size, crop, target
size) go in through the UNet's `text_time` added embedding."""

from __future__ import annotations

from typing import Any, Optional

from dbbatch.models.families.base import Family
from dbbatch.models.families.sd import _device, clip_text_config, load_common


def sizes(settings: Any, resolution: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(original size, crop top-left, target size) as (height, width) pairs; unset sizes are the resolution."""
    square = (resolution, resolution)
    if settings is None:
        return square, (0, 0), square
    return (tuple(settings.original_size or square), tuple(settings.crops_coords_top_left),  # type: ignore[return-value]
            tuple(settings.target_size or square))


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    section = "sdxl"
    kohya_text_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def load(self, folder: Any) -> dict[str, Any]:
        import torch
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return {"tokenizer": CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                "tokenizer_2": CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
                "text_encoder": CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"),
                                                                              dtype=torch.float32),
                **load_common(folder)}

    def build(self, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from dbbatch.models.assets import load_shipped_tokenizer

        tokenizer, tokenizer_2 = load_shipped_tokenizer("tokenizer"), load_shipped_tokenizer("tokenizer_2")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, arch["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, arch["text_encoder_2"]))
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                    tokenizer=tokenizer, tokenizer_2=tokenizer_2)

    def pipeline(self, parts: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        # add_watermarker False: the invisible-watermark package is not a dependency, and a watermark changes
        # the pixels the tests compare; force_zeros_for_empty_prompt as SDXL 1.0 ships it.
        return StableDiffusionXLPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"], scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False)

    def encode(self, encoders: list[Any], ids: list[Any]) -> dict[str, Any]:
        import torch

        hidden, pooled = [], None
        for encoder, tokens in zip(encoders, ids):
            out = encoder(tokens.to(_device(encoder)), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output: CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def added_conditioning(self, settings: Any, resolution: int) -> dict[str, Any]:
        import torch

        original, crop, target = sizes(settings, resolution)
        return {"time_ids": torch.tensor([[*original, *crop, *target]], dtype=torch.float32)}

    def conditioning_spec(self, settings: Any, resolution: int) -> dict[str, Any]:
        original, crop, target = sizes(settings, resolution)
        return {"family": self.name, "original_size": list(original), "crops_coords_top_left": list(crop),
                "target_size": list(target)}

    def fingerprint(self, settings: Any, resolution: int) -> dict[str, Any]:
        return {**self.conditioning_spec(settings, resolution),
                "train_text_encoder_2": bool(settings is not None and settings.train_text_encoder_2)}

    def trained_text_encoders(self, settings: Any) -> tuple[str, ...]:
        return self.text_encoders if settings is not None and settings.train_text_encoder_2 else self.text_encoders[:1]

    def render_options(self, settings: Any, resolution: int, negative_prompt: str) -> dict[str, Any]:
        original, crop, target = sizes(settings, resolution)
        # An empty negative prompt is None here: SDXL's pipeline then uses zeros, as it does for a user's call.
        return {"negative_prompt": negative_prompt or None, "original_size": original, "crops_coords_top_left": crop,
                "target_size": target}

    def kohya_version(self, model: Any) -> Optional[tuple[str, str]]:
        width = getattr(model.text_encoder_2.config, "hidden_size", None)  # SDXL 1.0: OpenCLIP ViT-bigG (1280)
        return ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora") if width == 1280 else None
