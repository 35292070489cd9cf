"""Sample: the subject's sample images (each prompt x seed, classifier-free guidance) and their grid.

Images an earlier attempt stored are not rendered again: the grid reads them back.
"""

from __future__ import annotations

import io

from dbbatch.batch.stages.context import SubjectContext
from dbbatch.core import signals
from dbbatch.store.locations import join


class Sample:
    def __init__(self, ctx: SubjectContext):
        self.c = ctx

    def run(self) -> None:
        """samples/prompt<row>-seed<seed>.png, samples/grid.png and samples/prompts.json."""
        from PIL import Image

        from dbbatch.models.sampling import generate, make_grid
        from dbbatch.train.images import png_bytes

        c = self.c
        cfg = c.s.samples
        prompts = c.s.sample_prompts()
        folder = join(c.out, "samples")
        names = [[f"prompt{r:02d}-seed{seed}.png" for seed in cfg.seeds] for r in range(len(prompts))]
        stored = {u.rsplit("/", 1)[-1] for u in c.storage.list_files(folder)}
        todo = [(r, col) for r in range(len(prompts)) for col in range(len(cfg.seeds)) if names[r][col] not in stored]
        task = c.b.reporter.start(f"{c.label}samples", total=len(todo), unit="img") if (c.b.reporter and todo) else None
        model = c.b.model
        model.denoiser.eval()

        made: dict[str, Image.Image] = {}

        def store(j: int, img: Image.Image, chunk: list[tuple[int, int]]) -> None:
            r, col = chunk[j]
            c.holds_lease("storing samples")
            c.storage.write_bytes(join(folder, names[r][col]), png_bytes(img))
            made[names[r][col]] = img
            if task:
                task.advance()

        for start in range(0, len(todo), cfg.batch_size):
            signals.check(f"{c.s.id} during sampling")
            chunk = todo[start : start + cfg.batch_size]
            generate(model, [prompts[r] for r, _ in chunk], [cfg.seeds[col] for _, col in chunk], c.resolution, cfg.steps,
                     cfg.guidance_scale, cfg.negative_prompt, cfg.batch_size, on_image=lambda j, img, ch=chunk: store(j, img, ch),
                     settings=model.family.settings_of(c.s))
        if task:
            task.close()
        # the grid: images made now from memory, those stored by an earlier attempt read back
        images = [made.get(n) or Image.open(io.BytesIO(c.storage.read_bytes(join(folder, n)))).convert("RGB")
                  for row in names for n in row]
        c.holds_lease("storing the sample grid")
        c.storage.write_bytes(join(folder, "grid.png"), png_bytes(make_grid(images, len(cfg.seeds))))
        c.storage.write_json(join(folder, "prompts.json"), {"rows": prompts, "columns": cfg.seeds, "files": names})
