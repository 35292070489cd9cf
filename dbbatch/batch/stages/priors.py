"""Priors: the class latents a subject trains its prior-preservation loss on, from cached class images.

The images are made once per class key and stored content-addressed (batch/priors.py); their latents are
encoded once per batch and shared by every subject of that class.
"""

from __future__ import annotations

from typing import Any

from dbbatch.batch.stages.context import SubjectContext
from dbbatch.core import signals


class Priors:
    def __init__(self, ctx: SubjectContext):
        self.c = ctx

    def class_latents(self) -> Any:
        """(mean, std) of the class images' latents; sets the context's `priors_generated`."""
        from dbbatch.batch.priors import ensure_priors, model_prior_spec, prior_key
        from dbbatch.train.data import latent_stats
        from dbbatch.train.images import to_tensor

        c = self.c
        model, s = c.b.model, c.s
        settings = model.family.settings_of(s)
        spec = model_prior_spec(model, s.class_prompt, c.resolution, s.priors, settings)
        key = prior_key(spec) + f":{s.priors.num_images}"
        if key not in c.b._class_latents:
            images, generated = ensure_priors(
                model, s.class_prompt, c.resolution, s.priors, c.b.opts.prior_cache, c.storage,
                c.b.reporter, c.label, should_stop=lambda: signals.check(f"{s.id} during prior generation"),
                settings=settings,
            )
            c.priors_generated = generated
            c.b._class_latents[key] = latent_stats(model.vae, to_tensor(images))
        else:
            c.priors_generated = 0
        return c.b._class_latents[key]
