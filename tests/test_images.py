"""images.py on real files of every awkward kind: pixels, sizes, warnings and the one-line refusals."""

from __future__ import annotations

import time

import hostile_files as hf
import pytest
from PIL import Image

from dbbatch.core.errors import ImageError
from dbbatch.train.images import MAX_PIXELS, MIN_SIDE, decode, decode_all, decode_files, pick_image_files


def corner(img: Image.Image, where: str) -> tuple[int, int, int]:
    """The colour at the middle of the BLOCK-sized square in a named corner."""
    vertical, horizontal = where.split("-")
    x = hf.BLOCK // 2 if horizontal == "left" else img.size[0] - 1 - hf.BLOCK // 2
    y = hf.BLOCK // 2 if vertical == "top" else img.size[1] - 1 - hf.BLOCK // 2
    return img.getpixel((x, y))


def close_to(actual, expected, tolerance=40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_puts_pixels_where_the_spec_says(orientation):
    img, notes = decode(hf.exif_jpeg(orientation), f"o{orientation}.jpg")
    turned = orientation >= 5
    assert img.size == (hf.STORED[::-1] if turned else hf.STORED)
    red_at, green_at = hf.expected_corners(orientation)
    assert close_to(corner(img, red_at), hf.RED), f"stored (0,0) should show {red_at}"
    assert close_to(corner(img, green_at), hf.GREEN), f"stored (last,0) should show {green_at}"
    others = {"top-left", "top-right", "bottom-left", "bottom-right"} - {red_at, green_at}
    for where in others:
        assert close_to(corner(img, where), (128, 128, 128)), where
    assert notes == []


def test_cmyk_becomes_rgb_with_the_right_colour():
    img, _ = decode(hf.cmyk_jpeg(), "print.jpg")
    assert img.mode == "RGB"
    assert close_to(img.getpixel((10, 10)), (0, 255, 255), tolerance=30)  # cyan


def test_16_bit_is_scaled_not_clipped():
    img, _ = decode(hf.gray16_png(), "scan.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (128, 128, 128)  # 32768 / 65535
    assert img.getpixel((1, 0)) == (0, 0, 0)
    assert img.getpixel((47, 0)) == (255, 255, 255)


def test_grayscale_becomes_three_equal_channels():
    img, _ = decode(hf.gray_png(level=90), "gray.png")
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (90, 90, 90)


def test_palette_transparency_is_composited_onto_white():
    img, _ = decode(hf.palette_transparent_png(), "logo.png")
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)
    assert img.getpixel((45, 2)) == hf.BLUE


def test_animated_gif_uses_the_first_frame_and_says_so():
    img, notes = decode(hf.animated_gif(), "anim.gif")
    assert close_to(img.getpixel((5, 5)), hf.GREEN, tolerance=10)
    assert notes == ["anim.gif: animated image with 3 frames; using the first frame"]


def test_phone_multi_picture_jpeg_uses_the_photo_silently():
    img, notes = decode(hf.phone_mpo(), "portrait.jpg")
    assert img.size == (48, 48) and close_to(img.getpixel((5, 5)), hf.RED, tolerance=10)
    assert notes == []


def test_bomb_is_refused_from_the_header_quickly():
    data = hf.bomb_png()
    assert len(data) < 1024 * 1024
    started = time.monotonic()
    with pytest.raises(ImageError) as e:
        decode(data, "bomb.png")
    assert time.monotonic() - started < 1.0  # decoding 2.5 GB of pixels would take far longer
    assert str(e.value) == (f"bomb.png: 2,500,000,000 pixels exceeds the limit of {MAX_PIXELS:,} pixels (8000x8000); "
                            "refused before decoding (a decompression bomb or a huge scan): downscale it and re-upload")


def test_over_our_limit_but_under_pils_is_refused_with_its_size():
    side = int(MAX_PIXELS ** 0.5) + 10  # over our limit, under PIL's warning threshold
    with pytest.raises(ImageError, match=rf"{side}x{side} = {side * side:,} pixels exceeds the limit"):
        decode(hf.bomb_png(side, side), "big.png")


@pytest.mark.parametrize("size", [(1, 1), (MIN_SIDE - 1, 500)])
def test_below_the_minimum_side_is_refused(size):
    with pytest.raises(ImageError, match=rf"{size[0]}x{size[1]} pixels is below the minimum of {MIN_SIDE} px"):
        decode(hf.save(Image.new("RGB", size, hf.RED), "PNG"), "tiny.png")


def test_minimum_side_itself_is_accepted_and_upscaled_with_a_warning():
    images, notes = decode_all([("small.png", hf.photo((MIN_SIDE, MIN_SIDE)))], 64)
    assert images[0].size == (64, 64)
    assert notes == [f"small.png: {MIN_SIDE}x{MIN_SIDE} is smaller than the resolution 64; upscaled"]


def test_duplicates_are_used_once_and_warned():
    a, b = hf.photo(color=hf.RED), hf.photo(color=hf.BLUE)
    images, notes = decode_all([("a.png", a), ("b.png", b), ("a-copy.png", a)], 32)
    assert len(images) == 2
    assert notes == ["a-copy.png: same bytes as a.png; duplicate skipped"]


def test_every_bad_file_is_reported_not_just_the_first():
    files = [("ok.png", hf.photo()), ("empty.jpg", b""), ("notes.jpg", hf.TEXT)]
    images, notes, errors = decode_files(files, 32)
    assert len(images) == 1
    assert [e.split(":")[0] for e in errors] == ["empty.jpg", "notes.jpg"]
    with pytest.raises(ImageError, match=r"^2 unusable images: empty\.jpg: .*; notes\.jpg: "):
        decode_all(files, 32)


@pytest.mark.parametrize("name, data, message", [
    ("zero.jpg", b"", "zero.jpg: the file is empty (0 bytes); re-upload the photo"),
    ("notes.jpg", hf.TEXT, "notes.jpg: the file is text, not an image (it starts 'this is not a photo, just some notes'); "
                           "upload the photo itself"),
    ("404.png", hf.HTML_404, "404.png: the file is an HTML page titled '404 Not Found', not an image; "
                             "the download probably failed: fetch the photo again"),
    ("error.jpg", b'{"error": "AccessDenied"}', "error.jpg: the file is a JSON document, not an image; "
                                                "the download probably failed: fetch the photo again"),
    ("noise.bin.jpg", bytes(range(7, 71)), "noise.bin.jpg: not a recognised image format (b'\\x07\\x08\\t\\n\\x0b\\x0c\\r\\x0e'...); "
                                           "use JPEG, PNG or WebP"),
])
def test_not_an_image(name, data, message):
    with pytest.raises(ImageError) as e:
        decode(data, name)
    assert str(e.value) == message


def test_truncated_jpeg():
    with pytest.raises(ImageError) as e:
        decode(hf.truncated_jpeg(), "cut.jpg")
    assert str(e.value) == "cut.jpg: the image is truncated (the upload or download was cut off); re-upload it"


@pytest.mark.parametrize("where, message", [
    (20, "bad.png: a PNG file with a damaged header; re-upload it"),  # inside IHDR: its checksum fails
    (80, "bad.png: the image is damaged or truncated (broken data stream when reading image file); re-upload it"),
])
def test_damaged_png(where, message):
    data = bytearray(hf.photo())
    data[where:where + 20] = b"\xff" * 20
    with pytest.raises(ImageError) as e:
        decode(bytes(data), "bad.png")
    assert str(e.value) == message


def test_listed_files_need_an_image_suffix_but_named_files_are_always_tried():
    urls = ["/p/a.JPG", "/p/b.heic", "/p/notes.txt", "/p/raw"]
    files, skipped = pick_image_files(urls, explicit=["/p/raw"])
    assert files == ["/p/a.JPG", "/p/raw"]
    assert skipped == ["/p/b.heic", "/p/notes.txt"]
