"""Decode and normalise subject photos: pure functions over bytes, no I/O.

Rules (documented in README, tested in tests/test_images.py):
- Pixel limit: an image declaring more than MAX_PIXELS pixels is refused from its header, before decoding
  (decompression bombs).
- Minimum size: the shorter side must be at least MIN_SIDE pixels, else the file is refused; below the
  training resolution it is upscaled with a warning.
- EXIF orientation (1-8) is applied; every mode (CMYK, 16-bit, grayscale, palette with transparency, RGBA)
  becomes 8-bit RGB, transparent areas composited onto white; an animated image uses its first frame, warned.
- Identical files (same bytes) are deduplicated, warned.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dbbatch.errors import ImageError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any phone photo, far below a 50000 x 50000 bomb
MIN_SIDE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class DecodedImage:
    name: str
    image: Image.Image  # RGB, oriented, not yet resized
    sha256: str


def has_image_suffix(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_SUFFIXES


def decode(data: bytes, name: str) -> tuple[Image.Image, list[str]]:
    """Bytes -> (8-bit RGB image with EXIF orientation applied, warnings). Raises ImageError naming `name`."""
    notes: list[str] = []
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes); re-upload the photo")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        raise ImageError(f"{name}: the file is text (an HTML/XML/JSON page), not an image; the download probably failed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    f"{name}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS:,} pixels; refused before decoding "
                    "(resize the photo)"
                )
            if getattr(img, "n_frames", 1) > 1:
                notes.append(f"{name}: animated image with {img.n_frames} frames; using the first frame")
                img.seek(0)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (PNG, JPEG, WebP, ...); is it really a photo?") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: the image is damaged or truncated ({str(e).splitlines()[0][:120]}); re-upload it") from None
    img = _oriented(img)
    img = to_rgb(img)
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{name}: {img.size[0]}x{img.size[1]} is below the minimum of {MIN_SIDE} px on the shorter side")
    return img, notes


def _oriented(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth failing the photo for
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white, 16-bit is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (Lanczos), then center-crop a square."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def decode_all(files: list[tuple[str, bytes]], resolution: int) -> tuple[list[Image.Image], list[str]]:
    """Decode, dedupe and fit a subject's files. Returns (images, warnings); raises on the first bad image."""
    seen: dict[str, str] = {}
    out: list[Image.Image] = []
    notes: list[str] = []
    for name, data in files:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            notes.append(f"{name}: same bytes as {seen[digest]}; duplicate skipped")
            continue
        seen[digest] = name
        img, more = decode(data, name)
        notes += more
        if min(img.size) < resolution:
            notes.append(f"{name}: {img.size[0]}x{img.size[1]} is smaller than the resolution {resolution}; upscaled")
        out.append(fit(img, resolution))
    return out, notes


def to_tensor(images: list[Image.Image]):  # -> torch.Tensor [N, 3, H, W] in [-1, 1]
    import torch

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_tensor(pixels) -> list[Image.Image]:  # pixels [N, 3, H, W] in [-1, 1]
    import torch

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
