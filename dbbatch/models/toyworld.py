"""The toy world `builtin:toy-sd` and `builtin:toy-clip` were pretrained on, and the colour checker (pure, seeded).

One flat-coloured shape (circle, square or triangle; random size and position) on a flat-coloured background,
from six named colours. Images are 32x32 RGB: the pretraining runs on one CPU thread, and a 32 px world costs
a quarter of the compute of a 64 px one per step (the prototype measured 4-5x the time at 64 px) while still
holding every colour and shape distinction; grids may upscale the images for display.

Captions: "a photo of a {colour} {shape} on a {background} background" and the partial forms "a photo of a
{colour} {shape}", "a photo of a {shape} on a {background} background", "a photo of a {shape}", and the empty
caption about 10% of the time (what classifier-free guidance needs). Some (colour, shape, background) triples
never occur in pretraining (`HELD_OUT`): prompts for them test that the model composes words it learnt apart.

The checker reads a generated image back into words: the background is the median of the border pixels, the
foreground the median of the pixels far from the background, each mapped to the nearest named colour; a split
subject (left half one colour, right half another) is checked half by half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
CAPTION_FORMS = ("full", "colour_shape", "shape_background", "shape", "empty")
# Probability of each caption form. Full captions carry the most words per image, so they get half the mass;
# the empty caption gets the ~10% classifier-free guidance needs.
CAPTION_WEIGHTS = (0.5, 0.14, 0.14, 0.12, 0.10)

# Triples never drawn in pretraining: each colour is the held-out foreground twice and the held-out
# background twice, each shape four times, and every one of these words still occurs in other triples.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"), ("red", "triangle", "white"),
    ("green", "square", "black"), ("green", "circle", "yellow"),
    ("blue", "triangle", "green"), ("blue", "square", "red"),
    ("yellow", "circle", "black"), ("yellow", "triangle", "red"),
    ("white", "square", "green"), ("white", "circle", "blue"),
    ("black", "triangle", "yellow"), ("black", "square", "white"),
)


@dataclass(frozen=True)
class Scene:
    """One image of the world: `colour` `shape` of half-width `radius` centred at (cx, cy), on `background`."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float


def training_triples() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with distinct colours that pretraining draws (all but HELD_OUT)."""
    held = set(HELD_OUT)
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c and (c, s, b) not in held]


def random_scene(rng: random.Random, triple: Optional[tuple[str, str, str]] = None, size: int = SIZE) -> Scene:
    """A scene with random placement; the triple is drawn from `training_triples()` unless given."""
    colour, shape, background = triple or rng.choice(training_triples())
    radius = rng.uniform(0.18, 0.34) * size
    margin = radius + 1
    return Scene(colour, shape, background, rng.uniform(margin, size - margin), rng.uniform(margin, size - margin), radius)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape, sampled at pixel centres."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    if shape == "triangle":  # upright, apex at the top, base at the bottom
        top, bottom = cy - radius, cy + radius
        half_width = radius * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB array."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = COLOURS[scene.background]
    img[shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, size)] = COLOURS[scene.colour]
    return img


def render_split(left: str, right: str, shape: str, background: str, cx: float, cy: float, radius: float,
                 size: int = SIZE) -> np.ndarray:
    """A two-coloured subject the world never contains: the shape's left half `left`, its right half `right`."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = COLOURS[background]
    mask = shape_mask(shape, cx, cy, radius, size)
    x = np.mgrid[0:size, 0:size][1] + 0.5
    img[mask & (x < cx)] = COLOURS[left]
    img[mask & (x >= cx)] = COLOURS[right]
    return img


def caption(scene: Scene, form: str) -> str:
    if form == "full":
        return f"a photo of a {scene.colour} {scene.shape} on a {scene.background} background"
    if form == "colour_shape":
        return f"a photo of a {scene.colour} {scene.shape}"
    if form == "shape_background":
        return f"a photo of a {scene.shape} on a {scene.background} background"
    if form == "shape":
        return f"a photo of a {scene.shape}"
    if form == "empty":
        return ""
    raise ValueError(f"unknown caption form {form!r}; one of {CAPTION_FORMS}")


def random_caption(rng: random.Random, scene: Scene) -> str:
    return caption(scene, rng.choices(CAPTION_FORMS, weights=CAPTION_WEIGHTS)[0])


def held_out_prompts(per_triple: int = 4) -> list[tuple[str, tuple[str, str, str]]]:
    """(prompt, triple) for the held-out triples, each `per_triple` times (12 triples x 4 = 48 prompts)."""
    return [(caption(Scene(c, s, b, 0, 0, 0), "full"), (c, s, b)) for c, s, b in HELD_OUT for _ in range(per_triple)]


# ------------------------------------------------------------------------------------------- the checker
def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def border_pixels(img: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of the outer `width`-pixel ring, as an (N, 3) array."""
    keep = np.zeros(img.shape[:2], dtype=bool)
    keep[:width], keep[-width:], keep[:, :width], keep[:, -width:] = True, True, True, True
    return img[keep].reshape(-1, 3)


# Pixels farther than this (RGB Euclidean) from the background's median count as foreground: about a third
# of the smallest distance between two named colours (green-blue, ~180), so blurred edges are mostly excluded.
FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND_FRACTION = 0.02  # fewer foreground pixels than this: no subject to name


def foreground_mask(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    bg = np.median(border_pixels(img), axis=0)
    return np.sqrt(((img - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE


def background_colour(img: np.ndarray) -> str:
    """Median of the border pixels -> nearest named colour."""
    return nearest_colour(np.median(border_pixels(np.asarray(img)), axis=0))


def foreground_colour(img: np.ndarray) -> Optional[str]:
    """Median of the pixels far from the background -> nearest named colour; None when there is no subject."""
    img = np.asarray(img)
    mask = foreground_mask(img)
    if mask.mean() < MIN_FOREGROUND_FRACTION:
        return None
    return nearest_colour(np.median(img[mask], axis=0))


def split_colours(img: np.ndarray) -> Optional[tuple[str, str]]:
    """(left, right): the named colours of the foreground's left and right halves (split at the median column
    of the foreground pixels); None when there is no subject."""
    img = np.asarray(img)
    mask = foreground_mask(img)
    if mask.mean() < MIN_FOREGROUND_FRACTION:
        return None
    xs = np.nonzero(mask)[1]
    middle = np.median(xs)
    columns = np.arange(img.shape[1])[None, :]
    left, right = mask & (columns < middle), mask & (columns > middle)
    if not left.any() or not right.any():
        return None
    return nearest_colour(np.median(img[left], axis=0)), nearest_colour(np.median(img[right], axis=0))


def is_split_subject(img: np.ndarray, left: str, right: str) -> bool:
    """The image shows a subject whose left half is `left` and right half is `right`."""
    return split_colours(img) == (left, right)


def is_single_coloured(img: np.ndarray) -> bool:
    """The image shows a subject whose two halves have the same named colour."""
    halves = split_colours(img)
    return halves is not None and halves[0] == halves[1]


def follows_prompt(img: np.ndarray, colour: Optional[str], background: Optional[str]) -> dict[str, bool]:
    """Which of the requested colours the image shows (only those requested are reported)."""
    out = {}
    if background is not None:
        out["background"] = background_colour(img) == background
    if colour is not None:
        out["foreground"] = foreground_colour(img) == colour
    return out
