"""Scoring subjects while they train: the evaluation points, the best step's weights, their resumable state.

A `Target` is one subject as the trainer sees it: its settings, its photos, and how to render images with its
current weights (a solo subject's model, or a packed subject's own adapter slot) and with the base model's.
`Scores` holds what a subject's evaluation has found so far (its points, its baseline, the best step's
weights) and travels in every checkpoint, so a resumed subject recomputes no past point and keeps its winner.
`ScoreDuringTraining` is the Lightning callback that scores each due step, before the checkpoint callback
saves that step. The metrics themselves are evaluation.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytorch_lightning as pl

from dbbatch.quality import evaluation

log = logging.getLogger(__name__)

Render = Callable[[list[str], list[int]], list[Any]]  # (prompts, seeds) -> one PIL image per pair


@dataclass
class Target:
    subject: Any  # manifest.Subject
    photos: list[Any]  # PIL images, as trained on
    render: Render  # with the subject's current weights
    weights: Callable[[], dict[str, Any]]  # a CPU copy of its trainable weights
    render_base: Optional[Render] = None  # with the base model's weights (adapters off); None for full fine-tunes
    active: Callable[[], bool] = lambda: True  # False: no longer trained (a packed subject that diverged)


def settings_key(subject: Any, resolution: int) -> str:
    """Digest of everything that makes two points comparable: models, prompts, seeds, sampling settings."""
    e, s = subject.evaluation, subject.samples
    data = {"clip": e.clip, "dino": e.dino, "prompts": prompts_of(subject), "class": subject.class_prompt, "seeds": e.seeds,
            "steps": s.steps, "guidance": s.guidance_scale, "negative": s.negative_prompt, "resolution": resolution,
            "select_by": e.selection(), "keep": e.keep}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prompts_of(subject: Any) -> list[str]:
    from dbbatch.config.manifest import format_prompt

    return [format_prompt(t, subject.token, subject.class_noun) for t in subject.evaluation_templates()]


@dataclass
class Scores:
    """A subject's evaluation so far (resumable: `state` / `restore`)."""

    key: str
    points: list[dict[str, Any]] = field(default_factory=list)
    baseline: Optional[dict[str, Any]] = None  # the base model's point (step 0)
    base_class: Optional[list[list[float]]] = None  # CLIP embeddings of the base model's class images
    best_step: Optional[int] = None
    best_weights: Optional[dict[str, Any]] = None

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def restore(cls, state: dict[str, Any]) -> "Scores":
        return cls(**state)


class Scorer:
    """Renders and scores one Target with the loaded embedders."""

    def __init__(self, target: Target, embedders: dict[str, Any], resolution: int, run_id: str):
        self.t, self.embedders, self.run_id = target, embedders, run_id
        s = target.subject
        self.id, self.cfg = s.id, s.evaluation
        self.prompts = prompts_of(s)
        self.texts = [evaluation.class_version(t, s.class_noun) for t in s.evaluation_templates()]
        self.scores = Scores(settings_key(s, resolution))
        self._photos: dict[str, Any] = {}

    def photos(self, key: str) -> Any:
        if key not in self._photos:
            self._photos[key] = self.embedders[key].images(self.t.photos)
        return self._photos[key]

    def evaluate(self, step: int, render: Render) -> tuple[dict[str, Any], Any]:
        """(the point at `step`, the CLIP embeddings of its class images) with `render`'s weights."""
        started = time.monotonic()
        seeds = list(self.cfg.seeds)
        pairs = [(p, seed) for p in self.prompts for seed in seeds]
        class_prompt = self.t.subject.class_prompt
        images = render([p for p, _ in pairs] + [class_prompt] * len(seeds), [seed for _, seed in pairs] + seeds)
        generated, klass = images[: len(pairs)], images[len(pairs) :]
        inputs: dict[str, Any] = {}
        if "dino" in self.embedders:
            dino = self.embedders["dino"]
            inputs.update(gen_dino=dino.images(generated), class_dino=dino.images(klass), photo_dino=self.photos("dino"))
        class_clip = None
        if "clip" in self.embedders:
            clip = self.embedders["clip"]
            class_clip = clip.images(klass)
            texts = clip.texts(self.texts)
            inputs.update(gen_clip=clip.images(generated), photo_clip=self.photos("clip"), class_clip=class_clip,
                          text_clip=texts.repeat(len(seeds), axis=0),
                          base_class_clip=self.scores.base_class)
        point = {"step": step, **evaluation.score(**inputs), "seconds": round(time.monotonic() - started, 3), "run_id": self.run_id}
        return point, class_clip

    def baseline(self, render: Render) -> None:
        """The base model's point (step 0); its class images are what class drift compares with."""
        point, class_clip = self.evaluate(0, render)
        self.scores.baseline = point
        self.scores.base_class = None if class_clip is None else class_clip.tolist()
        if class_clip is not None:
            self.scores.baseline["class_drift"] = 0.0

    def record(self, step: int) -> dict[str, Any]:
        """Score the current weights at `step`; keep them when they are the best so far (keep: best)."""
        point, _ = self.evaluate(step, self.t.render)
        self.scores.points.append(point)
        selection = self.cfg.selection()
        best = evaluation.best_step(self.scores.points, selection)
        if best == step and best != self.scores.best_step and self.cfg.keep == "best":
            self.scores.best_weights = self.t.weights()
        self.scores.best_step = best
        log.info("%s: evaluation at step %d: %s (%s; best step %s)", self.id, step,
                 ", ".join(f"{m} {point[m]:.3f}" for m in evaluation.METRICS if point.get(m) is not None),
                 evaluation.describe(selection), best)
        return point

    def restore(self, state: dict[str, Any]) -> None:
        scores = Scores.restore(state)
        if scores.key != self.scores.key:
            log.warning("%s: the evaluation settings changed since its last checkpoint: its %d earlier evaluation point(s) "
                        "are dropped (training itself resumes)", self.id, len(scores.points))
            return
        self.scores = scores

    def published_step(self, last_step: int) -> int:
        if self.cfg.keep == "best" and self.scores.best_step is not None and self.scores.best_weights is not None:
            return self.scores.best_step
        return last_step

    def published(self, last_step: int) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(metrics.json's `evaluation` and `published_step`, the best step's weights when they, not the last
        step's, are to be published)."""
        step = self.published_step(last_step)
        best = None
        if step != last_step:
            log.info("%s: publishing step %d (the best by %s) instead of the last step %d", self.id, step,
                     evaluation.describe(self.cfg.selection()), last_step)
            best = self.scores.best_weights
        return {"evaluation": self.summary(last_step), "published_step": step}, best

    def summary(self, last_step: int) -> dict[str, Any]:
        """metrics.json's `evaluation`: every point, the winner, the published step and its flags."""
        published = self.published_step(last_step)
        at = next((p for p in self.scores.points if p["step"] == published), None)
        flags = evaluation.flags(at, self.cfg.flag_below, self.cfg.flag_above, self.cfg.flag_not_improved,
                                 self.scores.baseline)
        return {"select_by": self.cfg.selection(), "keep": self.cfg.keep, "best_step": self.scores.best_step,
                "published_step": published, "points": self.scores.points, "baseline": self.scores.baseline,
                "published": at, "flagged": bool(flags), "flags": flags,
                "models": {"clip": self.cfg.clip, "dino": self.cfg.dino}, "prompts": self.prompts,
                "text_prompts": self.texts, "class_prompt": self.t.subject.class_prompt, "seeds": list(self.cfg.seeds)}


class ScoreDuringTraining(pl.Callback):
    """Scores each subject at its due steps (evaluation.due); listed before the checkpoint callback, so a
    checkpoint of step N holds the evaluation of step N."""

    def __init__(self, scorers: list[Scorer], max_steps: int):
        self.scorers, self.max_steps = scorers, max_steps
        self.restored: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {s.id: s.scores.state() for s in self.scorers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for s in self.scorers:  # keyed by subject: a cohort resumed from a larger one finds its members' states
            if s.id in state_dict:
                s.restore(state_dict[s.id])
                self.restored.add(s.id)

    def _rendering(self, pl_module: Any, work: Callable[[], Any]) -> Any:
        """`work` in eval mode; then every module back in the mode it was in (frozen parts stay in eval)."""
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            return work()
        finally:
            for module, training in modes:
                module.training = training

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        for s in self.scorers:
            if s.scores.baseline is not None:
                continue
            # the base model itself where it can be had (LoRA: adapters off), else the weights before step 1
            render = s.t.render_base if s.t.render_base is not None else s.t.render if trainer.global_step == 0 else None
            if render is None:  # resumed without a stored history: the base weights are gone (full fine-tune)
                log.warning("%s: no base-model evaluation (resumed at step %d without one); class_drift is not computed",
                            s.id, trainer.global_step)
                continue
            self._rendering(pl_module, lambda s=s, render=render: s.baseline(render))
        if trainer.global_step:  # resumed from a checkpoint of a due step that SIGTERM left unscored
            self._score_due(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self._score_due(trainer.global_step, pl_module)

    def _score_due(self, step: int, pl_module: Any) -> None:
        from dbbatch.core import signals

        if signals.requested():
            # preempted: the grace period is for this step's checkpoint; the resumed run scores this step first
            return
        for s in self.scorers:
            if s.t.active() and evaluation.due(step, s.cfg.every, self.max_steps) and all(p["step"] != step for p in s.scores.points):
                self._rendering(pl_module, lambda s=s: s.record(step))
