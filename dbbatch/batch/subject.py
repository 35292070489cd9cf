"""One subject, stage by stage: begin -> fetch -> priors -> train -> publish the model -> sample -> publish.

Every stage is idempotent and its results live in the output store (batch/batch.py says how a rerun uses
them). SubjectRun is the subject's context (stages/context.py) and runs its stages (stages/) in order; a
packed subject (batch/cohorts.py) runs the same stages but for training, which its cohort does.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from dbbatch.batch.stages.context import SubjectContext
from dbbatch.batch.stages.evaluate import Evaluate
from dbbatch.batch.stages.fetch import Fetch
from dbbatch.batch.stages.priors import Priors
from dbbatch.batch.stages.publish import Publish
from dbbatch.batch.stages.sample import Sample
from dbbatch.batch.stages.train import Train
from dbbatch.config.manifest import Subject
from dbbatch.core import signals
from dbbatch.core.errors import ImageError, InputError, StorageError
from dbbatch.store.layout import STAGE
from dbbatch.store.leases import Lease
from dbbatch.store.locations import join

log = logging.getLogger(__name__)


class SubjectRun(SubjectContext):
    """The stages of one subject. Attributes (SubjectContext) carry what one stage hands the next."""

    def __init__(self, batch: Any, subject: Subject, out: str, lease: Optional[Lease] = None):
        super().__init__(batch, subject, out, lease)
        self.fetch = Fetch(self)
        self.priors = Priors(self)
        self.evaluate = Evaluate(self)
        self.training = Train(self, self.evaluate)
        self.sample = Sample(self)
        self.publish = Publish(self, self.fetch.listing)

    def run(self) -> dict[str, Any]:
        stage = self.begin()
        if stage.get("stage") == "trained":  # the photos are not needed again: no download
            train_metrics = self.load_stored(stage)
        else:
            train_metrics = self.train_and_store(*self.inputs())
        return self.finish(train_metrics)

    def begin(self) -> dict[str, Any]:
        """--force's deletion, the resolution, and the stored stage if it still matches (else {})."""
        if self.b.opts.force:
            self.confirm_lease("deleting its outputs for --force")
            self.storage.remove(self.out, recursive=True)
        model = self.b.model
        res = self.s.resolution or model.native_resolution
        from dbbatch.batch.validation import resolution_step

        step = resolution_step(model.vae_scale_factor, model.family.latent_patch)
        if res % step:
            raise InputError(f"subject {self.s.id}: resolution {res} is not a multiple of {step} "
                             f"(diffusers renders multiples of 8; the model's VAE scale factor is {model.vae_scale_factor})")
        self.resolution = res
        from dbbatch.models.families import inapplicable

        for problem in inapplicable(model.family, self.s, f"subject {self.s.id}: ", self.b.manifest.base_model):
            raise InputError(problem)
        stage = self.storage.read_json(join(self.out, STAGE)) or {}
        if stage.get("stage") == "trained" and not self.stored_model_matches(stage):
            stage = {}
        return stage

    def inputs(self) -> tuple[list[Any], Any]:
        """The instance photos (decoded) and the class latents (None without prior images)."""
        t = time.monotonic()
        instance_images = self.fetch.load()
        self.fetch.store_row(instance_images)
        self.timed("images", t)
        t = time.monotonic()
        from_images = self.s.priors.source == "images"
        klass = self.priors.class_latents() if self.s.train.with_prior_preservation and from_images else None
        self.timed("priors", t)
        return instance_images, klass

    def train_and_store(self, instance_images: list[Any], klass: Any) -> dict[str, Any]:
        """Train this subject alone, then store its model and the `trained` stage. Returns its train metrics."""
        signals.check(f"{self.s.id} before training")
        t = time.monotonic()
        train_metrics = self.training.run(instance_images, klass)
        self.timed("train", t)
        self.publish.store_model(train_metrics)
        return train_metrics

    def load_stored(self, stage: dict[str, Any]) -> dict[str, Any]:
        log.info("%s: fine-tuned model already stored; loading it instead of training", self.s.id)
        t = time.monotonic()
        self.publish.load_trained()
        self.timed("load_trained", t)
        return stage["train"]

    def finish(self, train_metrics: dict[str, Any]) -> dict[str, Any]:
        """Samples, then config.yaml, metrics.json and `_SUCCESS`."""
        t = time.monotonic()
        self.sample.run()
        self.timed("sample", t)
        t = time.monotonic()
        metrics = self.publish.rest(train_metrics)
        self.timed("publish", t)
        try:  # the subject is published (_SUCCESS): nothing about its tracking may fail it now
            self.publish.end_tracking(metrics)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: could not finish its tracking runs: %s", self.s.id, e)
        return metrics

    def stored_model_matches(self, stage: dict[str, Any]) -> bool:
        """Whether the stored model was trained with this run's photos and settings. If not, say what changed
        and remove it (and the samples made from it), so the subject is trained again, never republished
        under a config.yaml that did not make it. The photos are read only when their listing changed."""
        from dbbatch.store.fingerprints import changes

        recorded = stage.get("fingerprint")
        if recorded is None:
            changed = ["its settings were not recorded (an older dbbatch stored it)"]
        else:
            try:
                listing = self.fetch.listing()
            except (ImageError, StorageError) as e:  # photos removed once the model was stored: nothing to compare
                if isinstance(e, StorageError) and not isinstance(e.__cause__, FileNotFoundError):
                    raise
                log.warning("%s: cannot check the stored model against the photos (%s); comparing its settings only",
                            self.s.id, e)
                listing = stage.get("instance_listing")
            if stage.get("instance_listing") == listing:
                self.images_digest = recorded.get("instance_images")
            else:
                self.fetch.load()
            changed = changes(recorded, self.fingerprint(stage=True))
        if not changed:
            return True
        log.warning("%s: the stored model was trained with other settings: %s; training again (its model/ and "
                    "samples/ are removed)", self.s.id, ", ".join(changed))
        self.confirm_lease("removing the outdated model")
        for name in (STAGE, "model", "lora", "samples"):
            self.storage.remove(join(self.out, name), recursive=name != STAGE)
        return False
