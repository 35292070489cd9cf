"""Draw the demo subjects' photos (no downloaded images): manifests/demo-images/{rex,tom}/.

Two subjects the toy world never contains, so what the demo's grids show is learnt from these photos alone:
rex is a square split blue (left) / yellow (right), photographed on white and green; tom is a triangle split
red (left) / white (right), on black and blue; kit is a circle split yellow (left) / blue (right), on red and white. The grids then ask for them on other backgrounds, next to the
class prompt's row. Deterministic: the same files every time. Usage: python scripts/make_demo_images.py [OUT_DIR]
"""

import random
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dbbatch.models import toyworld  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "manifests" / "demo-images"
SUBJECTS = {  # id: (shape, left colour, right colour, photo backgrounds)
    "rex": ("square", "blue", "yellow", ("white", "green", "white", "green")),
    "tom": ("triangle", "red", "white", ("black", "blue", "black", "blue")),
    "kit": ("circle", "yellow", "blue", ("red", "white", "red", "white")),
}


def main() -> None:
    for subject, (shape, left, right, backgrounds) in SUBJECTS.items():
        folder = OUT / subject
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(subject)
        for i, background in enumerate(backgrounds):
            s = toyworld.random_scene(rng, triple=(left, shape, background))
            img = toyworld.render_split(left, right, shape, background, s.cx, s.cy, s.radius)
            Image.fromarray(img).save(folder / f"{'abcd'[i]}.png")
    print(f"demo images in {OUT}")


if __name__ == "__main__":
    main()
