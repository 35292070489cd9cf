"""Evaluate: the subject's Scorer (quality/scoring.py) over the shared model, and what training's scores publish.

Off unless `evaluation.clip` or `evaluation.dino` is set. A solo subject is scored during training (one
process) or after it (DDP); a packed subject's scorer renders its own slot (batch/cohorts.py).
"""

from __future__ import annotations

import time
from typing import Any

from dbbatch.batch.stages.context import SubjectContext


class Evaluate:
    def __init__(self, ctx: SubjectContext):
        self.c = ctx

    def scorer(self, photos: list[Any], weights: Any = None, active: Any = None, current: Any = None, base: Any = None) -> Any:
        """The subject's Scorer (None without evaluation). It renders with the shared model inside `current()`
        (default: as it is), and with the base model inside `base()` (default: LoRA adapters switched off; none
        for a full fine-tune); `weights` defaults to the model's trainable parameters."""
        c = self.c
        if not c.s.evaluation.enabled:
            return None
        from contextlib import nullcontext

        from dbbatch.models.methods import trained_weights
        from dbbatch.models.sampling import generate
        from dbbatch.quality.scoring import Scorer, Target

        model, cfg = c.b.model, c.s.samples
        if base is None and c.s.train.method == "lora":
            from dbbatch.models.lora import adapters_off

            base = lambda: adapters_off(model.denoiser, *model.text_encoders)  # noqa: E731

        def inside(context: Any) -> Any:
            def render(prompts: list[str], seeds: list[int]) -> list[Any]:
                with context():
                    return generate(model, prompts, seeds, c.resolution, cfg.steps, cfg.guidance_scale,
                                    cfg.negative_prompt, cfg.batch_size, settings=model.family.settings_of(c.s))
            return render

        target = Target(c.s, photos, inside(current or nullcontext), weights or (lambda: trained_weights(model)),
                        inside(base) if base is not None else None, active or (lambda: True))
        t = time.monotonic()
        embedders = c.b.embedders(c.s)
        c.timed("load_evaluators", t)
        return Scorer(target, embedders, c.resolution, c.b.opts.run_id)

    def published(self, scorer: Any, steps: int, scored_during: bool) -> dict[str, Any]:
        """After training: metrics.json's `evaluation` (scored now at the last step if it was not scored during
        training), with the best step's weights put into the model when evaluation.keep is best."""
        if scorer is None:
            return {}
        from dbbatch.models.methods import load_weights

        model = self.c.b.model
        if not scored_during:
            model.denoiser.eval()
            if scorer.t.render_base is not None and scorer.scores.baseline is None:
                scorer.baseline(scorer.t.render_base)
            scorer.record(steps)
        entries, best = scorer.published(steps)
        if best is not None:
            load_weights(model, best)
        return entries
