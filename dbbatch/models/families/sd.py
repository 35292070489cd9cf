"""Stable Diffusion 1.x/2.x: one CLIP text encoder, whose last hidden states condition the UNet."""

from __future__ import annotations

from typing import Any, Optional

from dbbatch.models.families.base import Family


def _device(module: Any) -> Any:
    return next(module.parameters()).device


def clip_text_config(tokenizer: Any, config: dict[str, Any]) -> Any:
    """A CLIP text config of a built-in model, its vocabulary and special tokens from the shipped tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **config)


def load_common(folder: Any) -> dict[str, Any]:
    """The UNet and the VAE, as every UNet family stores them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return {"vae": AutoencoderKL.from_pretrained(str(folder / "vae")),
            "unet": UNet2DConditionModel.from_pretrained(str(folder / "unet"))}


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    kohya_text_prefixes = {"text_encoder": "lora_te_"}

    def load(self, folder: Any) -> dict[str, Any]:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        # transformers 5 keeps the saved dtype by default: an fp16 folder would give an fp16 encoder on the CPU.
        return {"tokenizer": CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                "text_encoder": CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32),
                **load_common(folder)}

    def build(self, arch: dict[str, Any], seed: int) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from dbbatch.models.assets import load_shipped_tokenizer

        tokenizer = load_shipped_tokenizer("tokenizer")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, arch["text_encoder"]))
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)

    def pipeline(self, parts: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                       unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def encode(self, encoders: list[Any], ids: list[Any]) -> dict[str, Any]:
        (encoder,), (tokens,) = encoders, ids
        return {"encoder_hidden_states": encoder(tokens.to(_device(encoder)))[0]}

    def kohya_version(self, model: Any) -> Optional[tuple[str, str]]:
        width = getattr(model.text_encoder.config, "hidden_size", None)  # SD 1.x: CLIP ViT-L (768); 2.x: OpenCLIP-H
        return {768: ("sd_v1", "stable-diffusion-v1/lora"), 1024: ("sd_v2", "stable-diffusion-v2-768-v/lora")}.get(width)
