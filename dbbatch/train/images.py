"""Decode and normalise subject photos: pure functions over bytes, no I/O.

Rules (tested in tests/test_images.py and tests/test_hostile_inputs.py):
- A file that is not a usable image fails its subject with one line naming the file: empty, text or an HTML
  error page saved under an image name, an unknown format, damaged or truncated data. Every bad file of a
  subject is listed, so one fix-up round is enough. (Skipping it silently would train on fewer photos than
  the user sent.)
- Pixel limit: an image declaring more than MAX_PIXELS pixels is refused from its header, before decoding
  (decompression bombs: a 50000 x 50000 PNG is a few KB on disk and 7.5 GB decoded).
- Minimum size: the shorter side must be at least MIN_SIDE pixels, else the file is refused (a thumbnail or
  a tracking pixel carries nothing to learn); between MIN_SIDE and the training resolution it is upscaled,
  with a warning.
- EXIF orientation (1-8) is applied; every mode (CMYK, 16-bit, grayscale, palette with transparency, RGBA)
  becomes 8-bit RGB, transparent areas composited onto white; an animated image uses its first frame, warned
  (a phone's multi-picture JPEG, MPO, uses its first picture silently).
- Identical files (same bytes) are used once, warned. System files (.DS_Store, Thumbs.db) never get here:
  listing drops them silently (storage.expand).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dbbatch.core.errors import ImageError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any phone photo, far below a 50000 x 50000 bomb
MIN_SIDE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_TEXT_STARTS = {b"<!doctype html": "an HTML page", b"<html": "an HTML page", b"<?xml": "an XML document",
                b"{": "a JSON document", b"[": "a JSON document"}
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def has_image_suffix(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_SUFFIXES


def pick_image_files(urls: list[str], explicit: list[str]) -> tuple[list[str], list[str]]:
    """(files to decode, names skipped). Listed folder/glob entries need an image suffix; files the manifest
    names one by one are always tried (and fail loudly if they are not images)."""
    named = set(explicit)
    files = [u for u in urls if u in named or has_image_suffix(u)]
    return files, [u for u in urls if u not in files]


def no_images_message(locations: list[str]) -> str:
    return (f"no image files at {', '.join(locations)}: the folder is empty or missing, or the pattern matches "
            f"nothing; put photos ({', '.join(sorted(IMAGE_SUFFIXES))}) there or fix the subject's images")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut in half at the end of `head`
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c.isspace() for c in text)


def _too_many_pixels(name: str, size: str) -> ImageError:
    return ImageError(f"{name}: {size} exceeds the limit of {MAX_PIXELS:,} pixels (8000x8000); refused before "
                      "decoding (a decompression bomb or a huge scan): downscale it and re-upload")


def decode(data: bytes, name: str) -> tuple[Image.Image, list[str]]:
    """Bytes -> (8-bit RGB image with EXIF orientation applied, warnings). Raises ImageError naming `name`."""
    notes: list[str] = []
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes); re-upload the photo")
    head = data[:512].lstrip()
    kind = next((what for start, what in _TEXT_STARTS.items() if head.lower().startswith(start)), None)
    if kind is not None:
        title = re.search(rb"<title[^>]*>([^<]{1,80})</title>", data[:8192], re.IGNORECASE)
        shown = f" titled {title.group(1).decode('utf-8', 'replace').strip()!r}" if title else ""
        raise ImageError(f"{name}: the file is {kind}{shown}, not an image; the download probably failed: fetch the photo again")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and raises at twice it; ours is lower and always an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _too_many_pixels(name, f"{w}x{h} = {w * h:,} pixels")
            # MPO: a phone JPEG with extra pictures (depth map, preview); the first is the photo, nothing to say
            if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
                notes.append(f"{name}: animated image with {img.n_frames} frames; using the first frame")
            img.seek(0)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # PIL's check runs inside open(), before we see the size
        raise _too_many_pixels(name, f"{int(found.group(1)):,} pixels" if found else "the declared size") from None
    except UnidentifiedImageError:
        fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), None)
        if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            fmt = "WebP"
        if fmt is not None:
            raise ImageError(f"{name}: a {fmt} file with a damaged header; re-upload it") from None
        if _looks_like_text(head):
            first_line = head.decode("utf-8", "ignore").strip().splitlines()[0][:40]
            raise ImageError(f"{name}: the file is text, not an image (it starts {first_line!r}); upload the photo itself") from None
        raise ImageError(f"{name}: not a recognised image format ({data[:8]!r}...); use JPEG, PNG or WebP") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "truncated" in str(e).lower():
            raise ImageError(f"{name}: the image is truncated (the upload or download was cut off); re-upload it") from None
        raise ImageError(f"{name}: the image is damaged or truncated ({str(e).splitlines()[0][:120]}); re-upload it") from None
    img = _oriented(img)
    img = to_rgb(img)
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{name}: {img.size[0]}x{img.size[1]} pixels is below the minimum of {MIN_SIDE} px on the "
                         "shorter side; use a larger photo")
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


def decode_files(files: Iterable[tuple[str, bytes]], resolution: int) -> tuple[list[Image.Image], list[str], list[str]]:
    """Decode, dedupe and fit each file. Returns (images, warnings, errors): one error line per unusable file,
    so every bad file is reported, not just the first. `files` may be lazy: one file's bytes at a time."""
    seen: dict[str, str] = {}
    out: list[Image.Image] = []
    notes: list[str] = []
    errors: list[str] = []
    for name, data in files:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            notes.append(f"{name}: same bytes as {seen[digest]}; duplicate skipped")
            continue
        seen[digest] = name
        try:
            img, more = decode(data, name)
        except ImageError as e:
            errors.append(str(e))
            continue
        notes += more
        if min(img.size) < resolution:
            notes.append(f"{name}: {img.size[0]}x{img.size[1]} is smaller than the resolution {resolution}; upscaled")
        out.append(fit(img, resolution))
    return out, notes, errors


def decode_all(files: Iterable[tuple[str, bytes]], resolution: int) -> tuple[list[Image.Image], list[str]]:
    """Decode, dedupe and fit a subject's files. Returns (images, warnings); raises ImageError naming every
    unusable file (one line)."""
    images, notes, errors = decode_files(files, resolution)
    if len(errors) == 1:
        raise ImageError(errors[0])
    if errors:
        raise ImageError(f"{len(errors)} unusable images: " + "; ".join(errors))
    return images, notes


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
