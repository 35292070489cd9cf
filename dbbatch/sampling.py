"""Seeded image generation with classifier-free guidance, and sample grids.

One generator serves both class priors and sample grids. Each image has its own seed (its own
`torch.Generator`), so image i is the same whether it is made alone or in a batch, and a partial set can be
topped up. Conditional and unconditional inputs go through the UNet in one batched forward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from PIL import Image


def apply_guidance(noise_uncond, noise_cond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): move from the unconditional towards the conditional."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def grid_shape(num_images: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of a grid with `columns` images per row."""
    if columns <= 0:
        raise ValueError("columns must be > 0")
    return (num_images + columns - 1) // columns, columns


def make_grid(images: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Images in row-major order -> one image; rows are prompts, columns are seeds."""
    rows, cols = grid_shape(len(images), columns)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def encode_prompts(model: Any, prompts: list[str], device: Any):
    """Token ids -> CLIP last hidden states, as SD conditions on them."""
    import torch

    tok = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model.text_encoder(tok.input_ids.to(device))[0]


def generate(
    model: Any,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    batch_size: int = 4,
    on_image: Optional[Callable[[int, Image.Image], None]] = None,
    output: str = "pil",
) -> list[Any]:
    """One image per (prompt, seed) pair, `prompts[i]` with `seeds[i]`. DDIM, eta 0: deterministic.
    `output="latent"` returns the final (scaled) latents instead of decoded images."""
    import torch
    from diffusers import DDIMScheduler

    from dbbatch.images import from_tensor

    assert len(prompts) == len(seeds)
    unet, vae = model.unet, model.vae
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    latent_size = resolution // model.vae_scale_factor
    channels = unet.config.in_channels
    scaling = vae.config.scaling_factor
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    uncond_cache: dict[str, Any] = {}
    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
        n = len(batch_prompts)
        cond = encode_prompts(model, batch_prompts, device).to(dtype)
        if negative_prompt not in uncond_cache:
            uncond_cache[negative_prompt] = encode_prompts(model, [negative_prompt], device).to(dtype)
        uncond = uncond_cache[negative_prompt].expand(n, -1, -1)
        context = torch.cat([uncond, cond])
        latents = torch.cat([
            torch.randn((1, channels, latent_size, latent_size), generator=torch.Generator("cpu").manual_seed(s))
            for s in batch_seeds
        ]).to(device=device, dtype=dtype)
        scheduler.set_timesteps(steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                noise = unet(model_in, t, encoder_hidden_states=context).sample
                noise_uncond, noise_cond = noise.chunk(2)
                latents = scheduler.step(apply_guidance(noise_uncond, noise_cond, guidance_scale), t, latents).prev_sample
            if output == "latent":
                out += list(latents.float().cpu())
                continue
            pixels = vae.decode(latents / scaling).sample
        for j, img in enumerate(from_tensor(pixels)):
            out.append(img)
            if on_image is not None:
                on_image(start + j, img)
    return out
