"""Class-prior images: made once per class key, stored content-addressed, shared by subjects and runs.

Layout: `<prior_cache>/<key>/000000.png ...` plus `prior.json` saying what the key stands for. The key hashes
everything that changes the pixels (base model identity, class prompt, negative prompt, resolution, sampler,
steps, guidance, seed, and the family's conditioning settings: SDXL's family name and micro-conditioning
sizes), not the image count: asking for more images tops the folder up, image i always made
with seed `seed + i`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, Callable, Optional

from PIL import Image

from dbbatch.core.errors import StorageError

log = logging.getLogger(__name__)
SAMPLER = "ddim-eta0"


def prior_spec(model_identity: str, class_prompt: str, resolution: int, priors: Any,
               conditioning: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """`conditioning`: the family's `conditioning_spec` (empty for SD 1.x/2.x: their keys are unchanged)."""
    return {
        "base_model": model_identity, "class_prompt": class_prompt, "negative_prompt": priors.negative_prompt,
        "resolution": resolution, "sampler": SAMPLER, "steps": priors.steps, "guidance_scale": priors.guidance_scale,
        "seed": priors.seed, **(conditioning or {}),
    }


def model_prior_spec(model: Any, class_prompt: str, resolution: int, priors: Any, settings: Any) -> dict[str, Any]:
    """The spec of a model's class images; `settings`: the subject's family section."""
    return prior_spec(model.identity, class_prompt, resolution, priors, model.family.conditioning_spec(settings, resolution))


def prior_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def missing_indices(existing_names: set[str], num_images: int) -> list[int]:
    return [i for i in range(num_images) if image_name(i) not in existing_names]


def ensure_priors(
    model: Any, class_prompt: str, resolution: int, priors: Any, cache_url: str, storage: Any,
    reporter: Any = None, label: str = "", should_stop: Optional[Callable[[], None]] = None, settings: Any = None,
) -> tuple[list[Image.Image], int]:
    """Return `priors.num_images` class images, generating only those the cache lacks. -> (images, generated).
    `settings`: the subject's family section (SDXL's micro-conditioning)."""
    from dbbatch.models.sampling import generate
    from dbbatch.store.locations import join

    spec = model_prior_spec(model, class_prompt, resolution, priors, settings)
    key = prior_key(spec)
    folder = join(cache_url, key)
    stored_spec = storage.read_json(join(folder, "prior.json"))
    if stored_spec is not None and stored_spec != spec:
        raise StorageError(f"prior cache {folder} holds images for {stored_spec} but its key says {spec}; delete that folder")
    if stored_spec is None:
        storage.write_json(join(folder, "prior.json"), spec)
    existing = {url.rsplit("/", 1)[-1] for url in storage.list_files(folder)}
    images: dict[int, Image.Image] = {}
    for i in range(priors.num_images):
        if image_name(i) in existing:
            url = join(folder, image_name(i))
            img, problem = _load_prior(storage.read_bytes(url), resolution)
            if problem:
                log.warning("%sclass image %s %s; regenerating it", label, url, problem)
                existing.discard(image_name(i))
            else:
                images[i] = img
    todo = missing_indices(existing, priors.num_images)
    if todo:
        log.info("%sgenerating %d of %d class images for %r (cache %s)", label, len(todo), priors.num_images, class_prompt, key)
        task = reporter.start(f"{label}priors", total=len(todo), unit="img") if reporter else None
        # Generate in chunks of batch_size and store each image as it is made, so a kill loses at most a batch.
        for start in range(0, len(todo), priors.batch_size):
            if should_stop is not None:
                should_stop()
            chunk = todo[start : start + priors.batch_size]

            def store(j: int, img: Image.Image, chunk: list[int] = chunk) -> None:
                from dbbatch.train.images import png_bytes

                storage.write_bytes(join(folder, image_name(chunk[j])), png_bytes(img))
                if task:
                    task.advance()

            generate(model, [class_prompt] * len(chunk), [priors.seed + i for i in chunk], resolution, priors.steps,
                     priors.guidance_scale, priors.negative_prompt, priors.batch_size, on_image=store, settings=settings)
        if task:
            task.close()
    for i in todo:  # read back what was just stored: the same pixels a later run will read
        url = join(folder, image_name(i))
        img, problem = _load_prior(storage.read_bytes(url), resolution)
        if problem:
            raise StorageError(f"class image {url} {problem} right after it was stored; check the prior cache's storage")
        images[i] = img
    return [images[i] for i in range(priors.num_images)], len(todo)


def _load_prior(data: bytes, resolution: int) -> tuple[Optional[Image.Image], Optional[str]]:
    """(RGB image, None), or (None, what is wrong with it): a prior cache is shared and long-lived, so a
    truncated upload, a file overwritten by hand or one of another size is found here, not by the stacking
    of class images into one tensor."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes fully: a truncated file fails here, not at open
        img = img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure means the file is unusable
        return None, f"cannot be decoded ({type(e).__name__}{': ' + str(e).splitlines()[0][:80] if str(e) else ''})"
    if img.size != (resolution, resolution):
        return None, f"is {img.size[0]}x{img.size[1]}, not {resolution}x{resolution}"
    return img, None
