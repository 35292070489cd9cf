"""Train: one subject alone, resumable from its stored checkpoints, scored as it trains (evaluate.py).

The base model is shared: what trains (full or LoRA, text encoders or not) is set up by models/methods.py and
put back by the batch afterwards. The Lightning module and the loop are in train/.
"""

from __future__ import annotations

import logging
from typing import Any

from dbbatch.batch.stages.context import SubjectContext
from dbbatch.batch.stages.evaluate import Evaluate
from dbbatch.core.errors import InputError
from dbbatch.store.locations import join

log = logging.getLogger(__name__)


class Train:
    def __init__(self, ctx: SubjectContext, evaluate: Evaluate):
        self.c, self.evaluate = ctx, evaluate

    def run(self, instance_images: list[Any], klass: Any) -> dict[str, Any]:
        """Train on the photos (and the class latents `klass`, None without prior images). Returns the train
        metrics metrics.json records."""
        from dbbatch.models.methods import make_trainable
        from dbbatch.quality.scoring import ScoreDuringTraining
        from dbbatch.train.data import LatentPairs, latent_stats, make_loader
        from dbbatch.train.fit import device_count, fit
        from dbbatch.train.images import to_tensor
        from dbbatch.train.module import DreamBoothModule, TextInputs

        c = self.c
        model, cfg = c.b.model, c.s.train
        if cfg.optimizer == "adamw8bit":
            from dbbatch.batch.validation import adamw8bit_lacks

            if lacking := adamw8bit_lacks():
                raise InputError(f"subject {c.s.id}: train.optimizer adamw8bit needs {lacking}; use adamw")
        instance = latent_stats(model.vae, to_tensor(instance_images))
        prior_from_base = cfg.with_prior_preservation and c.s.priors.source == "base_model"
        if prior_from_base:
            klass = instance  # no class images: the class prompt on the instance latents (README: priors.source)
            c.priors_generated = 0
        with_class = klass is not None
        trainable = make_trainable(model, c.s)
        c.trainable_parameters = trainable.parameters
        family = model.family
        added = family.added_conditioning(family.settings_of(c.s), c.resolution)
        if trainable.text_encoders:
            ids = lambda p: family.tokenize(model.tokenizers, [p])  # noqa: E731
            text = TextInputs(ids(c.s.instance_prompt), ids(c.s.class_prompt) if with_class else None, True, added)
        else:
            text = TextInputs(model.encode([c.s.instance_prompt]), model.encode([c.s.class_prompt]) if with_class else None,
                              False, added)
        if cfg.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
        fingerprint = c.fingerprint()
        meta = {"base_model": model.identity, "subject": c.s.id, "train": cfg.model_dump(), "fingerprint": fingerprint}
        module = DreamBoothModule(model.denoiser, {name: getattr(model, name) for name in trainable.text_encoders}, text, cfg,
                                  model.scheduler_config, model.vae.config.scaling_factor, meta,
                                  adapters_only=trainable.adapters_only, prior_from_base=prior_from_base, family=family,
                                  encoders=model.text_encoders if trainable.text_encoders else (),
                                  shift_factor=model.latent_shift, family_settings=family.settings_of(c.s))
        loader = make_loader(LatentPairs(instance, klass), cfg.batch_size, cfg.seed)
        resume, checkpointer = self.checkpoints(fingerprint)
        resume_path = str(resume.local) if resume else None
        resumed_from = resume.step if resume else None
        scorer = self.evaluate.scorer(instance_images)
        in_process = device_count(cfg.devices) == 1  # DDP ranks are other processes: scored after training instead
        if scorer is not None and not in_process and not resumed_from and scorer.scores.baseline is None:
            model.denoiser.eval()  # the base model's point, while the base weights are still here (scored after training)
            scorer.baseline(scorer.t.render_base or scorer.t.render)
        if scorer is not None and not in_process and c.s.evaluation.keep == "best":
            log.warning("%s: evaluation.keep best scores during training, which runs in one process; with %d devices only "
                        "the last step is scored and published (set train.devices: 1 to choose a best step)",
                        c.s.id, device_count(cfg.devices))
        scoring = (ScoreDuringTraining([scorer], cfg.max_steps),) if scorer is not None and in_process else ()
        task = c.b.reporter.start(f"{c.label}train", total=cfg.max_steps, unit="step") if c.b.reporter else None
        try:
            if task is not None and resumed_from:
                task.set(resumed_from)
            result = fit(module, loader, cfg, checkpointer, c.work / "logs", resume_path, task, c.s.id, scoring,
                         c.tracking().loggers(), c.b.manifest.tracking.tensorboard)
        finally:
            if task is not None:
                task.close()
            if cfg.gradient_checkpointing:
                model.denoiser.disable_gradient_checkpointing()
        model.to(c.b.device)  # Lightning's teardown moved the trained modules to the CPU
        losses = result.losses
        if not in_process:  # DDP ranks do not log to tracking services: the curve goes in now
            c.tracking().log_losses(losses, result.steps - len(losses))
        evaluated = self.evaluate.published(scorer, result.steps, scored_during=bool(scoring))
        return {**evaluated,
            "steps": result.steps, "final_loss": losses[-1] if losses else None,
            "mean_loss": sum(losses) / len(losses) if losses else None, "loss_curve": losses,
            "resumed_from_step": resumed_from, "checkpoint_seconds": result.checkpoint_seconds,
            "checkpoint_bytes": result.checkpoint_bytes, "priors_generated": c.priors_generated,
            "instance_images": len(instance_images), "method": cfg.method, "trainable_parameters": c.trainable_parameters,
        }

    def checkpoints(self, fingerprint: dict[str, Any]) -> tuple[Any, Any]:
        """(the stored checkpoint to resume or None, the checkpointer that stores this run's) under
        `<output>/<subject>/checkpoints/`."""
        from dbbatch.train.checkpoints import StoreCheckpoints, pick_resume

        c = self.c
        cfg = c.s.train
        remote = join(c.out, "checkpoints")
        c.confirm_lease("choosing a checkpoint (unusable ones are removed)")
        resume = pick_resume(c.storage, remote, c.work / "resume", fingerprint, cfg, c.s.id)
        if resume is not None:
            log.info("%s: resuming from %s", c.s.id, resume.url)
        checkpointer = StoreCheckpoints(c.storage, remote, c.work / "checkpoints", cfg.checkpoint_every,
                                        cfg.checkpoints_keep, cfg.max_steps, guard=c.lease.check if c.lease else None)
        return resume, checkpointer
