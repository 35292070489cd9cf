"""Bad and awkward image files, made at test time (nothing binary is committed).

Each function returns the bytes of one file as a phone, a web upload or a broken download would produce it.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw

RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 200, 40), (30, 40, 230), (240, 220, 10)


def photo(size=(64, 48), color=RED, fmt="PNG") -> bytes:
    img = Image.new("RGB", size, (200, 210, 220))
    ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=color)
    return save(img, fmt)


def save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut off mid-scan, as an interrupted upload leaves it (headers intact, pixels missing)."""
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise, "RGB"), "JPEG", quality=95)
    return data[: len(data) * 6 // 10]


TEXT = b"this is not a photo, just some notes\n"
HTML_404 = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
            b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A PNG whose header declares width x height 8-bit gray pixels (2.5 GB for 50000^2), with a few bytes of
    compressed data: a decompression bomb. It must be refused from the header, before any decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)  # the first rows only: enough to look real
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def cmyk_jpeg(size=(48, 48)) -> bytes:
    """Print-workflow JPEG in CMYK: pure cyan."""
    return save(Image.new("CMYK", size, (255, 0, 0, 0)), "JPEG", quality=95)


def gray16_png(size=(48, 48)) -> bytes:
    """16-bit grayscale PNG: left half 0, right half 65535 (a scanner or a medical export)."""
    import numpy as np

    arr = np.zeros((size[1], size[0]), dtype=np.uint16)
    arr[:, size[0] // 2:] = 65535
    arr[0, 0] = 32768  # mid-gray in 16 bits is 128 in 8 bits, not clipped to 255
    return save(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def gray_png(size=(48, 48), level=90) -> bytes:
    return save(Image.new("L", size, level), "PNG")


def palette_transparent_png(size=(48, 48)) -> bytes:
    """Palette PNG: index 0 fully transparent (left half), index 1 blue (right half)."""
    img = Image.new("P", size, 0)
    img.putpalette(list((0, 0, 0)) + list(BLUE) + [0] * (3 * 254))
    ImageDraw.Draw(img).rectangle((size[0] // 2, 0, size[0], size[1]), fill=1)
    return save(img, "PNG", transparency=0)


def animated_gif(colors=(GREEN, RED, BLUE), size=(48, 48)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colors]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def phone_mpo(size=(48, 48)) -> bytes:
    """A JPEG with a second picture attached (MPO), as phones save portrait-mode photos: red photo, blue extra."""
    extra = Image.new("RGB", (size[0] // 2, size[1] // 2), BLUE)
    return save(Image.new("RGB", size, RED), "MPO", save_all=True, append_images=[extra])


# EXIF orientation, from the EXIF 2.3 specification: where the stored image's row 0 and column 0 lie in the
# picture as it should be shown. Written out here, not taken from PIL, so the test checks PIL against the spec.
#   value: (row 0 is the picture's ..., column 0 is the picture's ...)
EXIF_SIDES = {1: ("top", "left"), 2: ("top", "right"), 3: ("bottom", "right"), 4: ("bottom", "left"),
              5: ("left", "top"), 6: ("right", "top"), 7: ("right", "bottom"), 8: ("left", "bottom")}
STORED = (64, 40)  # stored width x height: not square, so a missing 90 degree turn shows in the size
BLOCK = 12


def exif_jpeg(orientation: int) -> bytes:
    """A JPEG stored sideways/mirrored as a camera writes it, with the EXIF tag saying how to show it.
    Stored pixel (0, 0) is red, stored (last column, row 0) is green, the rest gray."""
    img = Image.new("RGB", STORED, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, BLOCK - 1, BLOCK - 1), fill=RED)
    draw.rectangle((STORED[0] - BLOCK, 0, STORED[0] - 1, BLOCK - 1), fill=GREEN)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, "JPEG", quality=95, exif=exif.tobytes())


def expected_corners(orientation: int) -> tuple[str, str]:
    """Which displayed corner stored (0, 0) and stored (last column, 0) land in, per EXIF_SIDES."""
    row0, col0 = EXIF_SIDES[orientation]
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    # stored (0, 0) is where row 0 meets column 0; stored (last, 0) is on row 0's side, opposite column 0.
    vertical = lambda a, b: (a, b) if a in ("top", "bottom") else (b, a)  # noqa: E731
    first = vertical(row0, col0)
    last = vertical(row0, opposite[col0])
    return "-".join(first), "-".join(last)
