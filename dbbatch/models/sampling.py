"""Seeded image generation with classifier-free guidance, and sample grids.

One generator serves both class priors and sample grids: the model family's own diffusers pipeline. Each
image has its own seed (its own `torch.Generator`), so image i is the same whether it is made alone or in a
batch, and a partial set can be topped up. The pipelines put the conditional and unconditional inputs
through the UNet in one batched forward (tests/test_families.py checks both guarantees for every family).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from PIL import Image


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
    settings: Any = None,
) -> list[Any]:
    """One image per (prompt, seed) pair, `prompts[i]` with `seeds[i]`, through the family's diffusers
    pipeline with DDIM, eta 0 (deterministic): what a user's `pipe(prompt, generator=...)` makes from the same
    model. `settings`: the subject's family section (SDXL's micro-conditioning sizes). `output="latent"`
    returns the final (scaled) latents instead of decoded images."""
    import torch

    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    options = model.family.render_options(settings, resolution, negative_prompt)
    negative = options.pop("negative_prompt")
    assert len(prompts) == len(seeds)
    out: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
        result = pipe(
            prompt=batch_prompts, negative_prompt=None if negative is None else [negative] * len(batch_prompts),
            height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in batch_seeds],
            output_type="latent" if output == "latent" else "pil", **options,
        ).images
        if output == "latent":
            out += list(result.float().cpu())
            continue
        for j, img in enumerate(result):
            out.append(img)
            if on_image is not None:
                on_image(start + j, img)
    return out
