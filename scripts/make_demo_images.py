"""Draw the demo subjects' photos (small PNGs; no downloaded images): manifests/demo-images/{rex,tom}/.

rex is a red disc on varied backgrounds, tom a blue triangle: distinctive looks a tiny model can learn.
Deterministic: the same files every time. Usage: python scripts/make_demo_images.py [OUT_DIR]
"""

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "manifests" / "demo-images"


def draw(shape: str, color: tuple[int, int, int], seed: int, size: int = 96) -> Image.Image:
    rng = random.Random(seed)
    bg = tuple(rng.randint(170, 240) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 3)
    cx, cy = size // 2 + rng.randint(-8, 8), size // 2 + rng.randint(-8, 8)
    if shape == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def main() -> None:
    for subject, shape, color, n in (("rex", "disc", (220, 30, 30), 4), ("tom", "triangle", (30, 60, 220), 2)):
        folder = OUT / subject
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw(shape, color, seed=i * 7 + len(subject)).save(folder / f"{'abcd'[i]}.png")
    print(f"demo images in {OUT}")


if __name__ == "__main__":
    main()
