"""One batch, one subject at a time: skip if done -> fetch -> priors -> train -> sample -> publish.

Every stage is idempotent and its results live in the output store, so a rerun (on any machine) redoes only
what is missing: `_SUCCESS` means done; `_stage.json` says the fine-tuned model is stored (a rerun samples
and publishes without training again); stored checkpoints resume training; stored priors and sample images
are not made again. `_SUCCESS` is always written last. One subject failing never stops the others.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import re
import socket
import shutil
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

from dbbatch import __version__, faults, signals
from dbbatch.errors import DbbatchError, ImageError, InputError, LeaseLost, Preempted, StorageError
from dbbatch.leases import Lease, LeaseGroup, Leases, describe, failed_since, holder_is_dead, holder_of, is_live, worker_identity
from dbbatch.manifest import Manifest, Subject
from dbbatch.storage import Storage, join, redact

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STAGE = "_stage.json"
PHOTOS = "photos.png"


@dataclass
class SubjectResult:
    id: str
    status: str  # succeeded | skipped | failed | preempted
    output: str
    steps: int = 0
    final_loss: Optional[float] = None
    seconds: float = 0.0
    error_class: Optional[str] = None
    message: Optional[str] = None
    flags: list[str] = field(default_factory=list)  # why its published step needs a human (evaluation.flag_*)


@dataclass
class RunOptions:
    output: str
    prior_cache: str
    work_dir: Path
    force: bool = False
    debug: bool = False
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6])
    leases: bool = True  # False: --no-leases (an output that cannot hold one; the user accepted the risk)
    lease_seconds: float = 120.0
    poll_seconds: Optional[float] = None  # how often to look at subjects leased by others; default ttl/4, <= 10 s


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"dbbatch": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "pytorch-lightning", "torchdata"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class Batch:
    """Runs subjects against one base model that is loaded once and restored between subjects."""

    def __init__(self, manifest: Manifest, base_dir: Optional[Path], storage: Storage, options: RunOptions, reporter: Any):
        self.manifest, self.base_dir, self.storage, self.opts, self.reporter = manifest, base_dir, storage, options, reporter
        self._model: Any = None
        self._class_latents: dict[str, Any] = {}  # prior key -> (mean, std): encoded once per batch
        self._embedders: dict[tuple[str, str], Any] = {}  # (evaluation key, source) -> Embedder: once per process
        self.reset_seconds: list[float] = []  # putting the base model back after each subject (bench/run.py)
        self.device: Any = None
        self.leases = Leases(storage, options.output, options.run_id, options.lease_seconds) if options.leases else None
        self.tracked: dict[str, Any] = {}  # subject id -> its open tracking runs (tracking.SubjectRuns)
        # Scratch of this process only: two workers sharing a work dir never touch each other's files.
        self.scratch = scratch_dir(options.work_dir, options.run_id)

    # -- the base model, once per process ---------------------------------------------------------------------
    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from dbbatch.models import load_base_model

            started = time.monotonic()
            self._model = load_base_model(self.manifest.base_model, self.base_dir, self.opts.work_dir / "cache", self.storage)
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._model.to(self.device)
            self.model_load_seconds = time.monotonic() - started
            log.info("base model %s loaded in %.1fs (identity %s)", self.manifest.base_model, self.model_load_seconds, self._model.identity)
        return self._model

    def embedders(self, subject: Subject) -> dict[str, Any]:
        """The subject's evaluation models (evaluation.clip, evaluation.dino), each loaded once per process."""
        from dbbatch import evaluators

        out = {}
        for key in ("clip", "dino"):
            source = getattr(subject.evaluation, key)
            if source is None:
                continue
            if (key, source) not in self._embedders:
                self._embedders[(key, source)] = evaluators.load(source, key, self.base_dir, self.opts.work_dir / "cache", self.storage)
            out[key] = self._embedders[(key, source)]
        return out

    def tracking(self, subject: Subject, out: str, guard: Any = None) -> Any:
        """The subject's tracking runs, opened once per attempt (continuing the runs its stored ids name)."""
        from dbbatch.tracking import Context, SubjectRuns

        if subject.id not in self.tracked:
            ctx = Context(self.opts.run_id, self.manifest.base_model, self.opts.output, redact(self.opts.output),
                          self.opts.work_dir, self.base_dir)
            self.tracked[subject.id] = SubjectRuns(self.manifest.tracking, subject, out, self.storage, ctx, guard).open()
        return self.tracked[subject.id]

    def end_tracking(self, subject: Subject, e: BaseException, message: str) -> None:
        """A failed subject's runs end as failed; a preempted one's stay open for the attempt that resumes it, as
        do those of a subject whose lease was lost (the worker that took it over continues them)."""
        runs = self.tracked.pop(subject.id, None)
        if runs is not None and not isinstance(e, (Preempted, LeaseLost)):
            runs.close("failed", summary={"error": message})

    def state_of(self, subject: Subject) -> str:
        out = join(self.opts.output, subject.id)
        if self.storage.exists(join(out, SUCCESS)):
            return "done"
        current = self.leases.current(subject.id) if self.leases else None
        if current and is_live(current, time.time()):
            if holder_is_dead(current.get("holder") or {}, self.leases.machine):
                return f"leased by {holder_of(current)}, which died; the next run takes it over at once"
            return f"leased by {describe(current)}"
        stage = self.storage.read_json(join(out, STAGE))
        if stage:
            return f"model stored, {stage.get('stage')}"
        ckpts = self.storage.list_files(join(out, "checkpoints"))
        if ckpts:
            from dbbatch.checkpoints import latest, step_of

            return f"resumable from step {step_of(latest(ckpts))}"
        return "pending"

    def run(self, subjects: list[Subject]) -> list[SubjectResult]:
        """Every subject once, in manifest order (packing: cohort by cohort, see packing.py). A subject leased by
        another worker is passed over and looked at again after each subject (or cohort) this worker finishes;
        when only such subjects are left, this worker waits until each is done (skipped), released (taken) or
        expired (taken over). So two workers on one output (a replacement pod beside a live one, or `--queue`
        pods) never train a subject twice, and no worker idles while an unleased subject remains."""
        from dbbatch.packing import cohorts

        remove_orphan_scratch(self.opts.work_dir)
        results: dict[str, SubjectResult] = {}
        pending = list(subjects)
        waiting_for: set[str] = set()
        per_step = self.manifest.packing.subjects_per_step
        stored = [] if self.opts.force else self.stored_cohorts()  # --force resumes nothing
        try:
            while pending:
                for group in cohorts(pending, per_step, stored):
                    if group.packed:
                        done = self.attempt_cohort(group, waiting_for)
                    else:
                        result = self.attempt(group.members[0], waiting_for)
                        done = {result.id: result} if result is not None else {}
                    if done:
                        break
                else:  # every pending subject is held by another worker
                    if signals.requested():
                        results.update({s.id: SubjectResult(s.id, "preempted", join(self.opts.output, s.id), error_class="Preempted",
                                                            message="SIGTERM received while it was leased by another worker")
                                        for s in pending})
                        break
                    time.sleep(self.poll_seconds)
                    stored = [] if self.opts.force else self.stored_cohorts()
                    continue
                results.update(done)
                pending = [s for s in pending if s.id not in done]
                waiting_for -= set(done)
                if any(r.status == "preempted" for r in done.values()):
                    results.update({s.id: SubjectResult(s.id, "pending", join(self.opts.output, s.id)) for s in pending})
                    break
                if not self.opts.force and any(group.packed for group in cohorts(pending, per_step, stored)):
                    stored = self.stored_cohorts()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            remove_orphan_scratch(self.opts.work_dir)  # workers that died while this one ran
        return [results[s.id] for s in subjects]

    def stored_cohorts(self) -> list[Any]:
        from dbbatch.cohorts import stored_cohorts

        return stored_cohorts(self.storage, self.opts.output)

    def attempt_cohort(self, group: Any, waiting_for: set[str]) -> dict[str, SubjectResult]:
        """Claim every member of a cohort that is not done and not leased by another worker, and train those
        together. Returns the results of the members it dealt with (none: all are held by others)."""
        from dbbatch.cohorts import CohortRun

        results: dict[str, SubjectResult] = {}
        claimed: list[tuple[Subject, Optional[Lease]]] = []
        renewal: Optional[LeaseGroup] = None
        try:
            for subject in group.members:
                try:
                    if (skipped := self.skipped_as_done(subject)) is not None:
                        results[subject.id] = skipped
                        continue
                    if self.leases is None:
                        claimed.append((subject, None))
                        continue
                    claim = self.leases.claim(subject.id, unless_failed_since=self.leases.started_at)
                except DbbatchError as e:
                    results[subject.id] = self.failure(subject, e, 0.0)
                    continue
                if claim.lease is not None:
                    if (skipped := self.skipped_as_done(subject)) is not None:  # finished since our first look
                        claim.lease.release("done")
                        results[subject.id] = skipped
                    else:
                        claimed.append((subject, claim.lease))
                    continue
                if (held := self.held_elsewhere(subject, claim.current or {}, waiting_for)) is not None:
                    results[subject.id] = held
            if claimed:
                leases = [lease for _, lease in claimed if lease is not None]
                renewal = LeaseGroup(leases) if leases else None  # one thread renews them all
                results.update(CohortRun(self, group, claimed).run())
        finally:
            for subject, lease in claimed:
                if lease is not None and not lease.released:
                    lease.release(*_lease_outcome(results.get(subject.id)))
            if renewal is not None:
                renewal.stop()
        return results

    @property
    def poll_seconds(self) -> float:
        if self.opts.poll_seconds is not None:
            return self.opts.poll_seconds
        return min(10.0, self.opts.lease_seconds / 4)

    def attempt(self, subject: Subject, waiting_for: set[str]) -> Optional[SubjectResult]:
        """Skip, refuse or run one subject; None when another worker holds its lease (try again later)."""
        out = join(self.opts.output, subject.id)
        try:
            if (skipped := self.skipped_as_done(subject)) is not None:
                return skipped
            if self.leases is None:
                return self.run_one(subject, None)
            claim = self.leases.claim(subject.id, unless_failed_since=self.leases.started_at)
        except DbbatchError as e:
            log.error("%s: failed: %s", subject.id, e)
            return SubjectResult(subject.id, "failed", out, error_class=type(e).__name__, message=str(e))
        if claim.lease is None:
            return self.held_elsewhere(subject, claim.current or {}, waiting_for)
        lease = claim.lease
        result: Optional[SubjectResult] = None
        try:  # its last holder may have finished it after our first look
            result = self.skipped_as_done(subject) or self.run_one(subject, lease)
        finally:
            lease.release(*_lease_outcome(result))
        return result

    def held_elsewhere(self, subject: Subject, current: dict[str, Any], waiting_for: set[str]) -> Optional[SubjectResult]:
        """A subject whose lease another worker holds (`current`): its result when that worker failed it in this pass
        or --force is refused; None (try again later) when it is being worked on."""
        out = join(self.opts.output, subject.id)
        if failed_since(current, self.leases.started_at):
            message = f"failed in {holder_of(current)}: {current.get('message')}; not retried in this pass (rerun to retry)"
            log.error("%s: %s", subject.id, message)
            return SubjectResult(subject.id, "failed", out, error_class=current.get("error_class") or "Failed", message=message)
        if self.opts.force:
            message = (f"subject {subject.id}: --force refused: {describe(current)} is working on it; wait for it to finish "
                       "(or stop that worker) and rerun")
            log.error("%s: failed: %s", subject.id, message)
            return SubjectResult(subject.id, "failed", out, error_class="LeaseHeld", message=message)
        if subject.id not in waiting_for:
            log.info("%s: leased by %s; working on other subjects meanwhile", subject.id, describe(current))
            waiting_for.add(subject.id)
        return None

    def skipped_as_done(self, subject: Subject) -> Optional[SubjectResult]:
        """The 'skipped' result if `_SUCCESS` is stored (and not --force), asked of the store, not of a listing
        cache: another worker may have written it."""
        out = join(self.opts.output, subject.id)
        done = join(out, SUCCESS)
        if self.opts.force or not self.storage.exists(done, fresh=True):
            return None
        log.info("%s: already done (%s exists); skipped", subject.id, done)
        return SubjectResult(subject.id, "skipped", out)

    def run_one(self, subject: Subject, lease: Optional[Lease] = None) -> SubjectResult:
        return self.outcome(subject, lambda: SubjectRun(self, subject, join(self.opts.output, subject.id), lease).run())

    def outcome(self, subject: Subject, work: Any) -> SubjectResult:
        """Run `work()` (the rest of a subject: it returns its metrics) and turn what happens into its result:
        one subject failing never sinks the batch. The base model is reset afterwards."""
        out = join(self.opts.output, subject.id)
        started = time.monotonic()
        faults.set_subject(subject.id)
        try:
            metrics = work()
            log.info("%s: done in %.1fs -> %s", subject.id, time.monotonic() - started, out)
            return SubjectResult(subject.id, "succeeded", out, steps=metrics["steps"], final_loss=metrics.get("final_loss"),
                                 seconds=time.monotonic() - started, flags=(metrics.get("evaluation") or {}).get("flags", []))
        except Exception as e:  # noqa: BLE001 - one subject never sinks the batch
            return self.failure(subject, e, time.monotonic() - started)
        finally:
            faults.set_subject(None)
            if self._model is not None:
                self.reset_seconds.append(self.reset_model())

    def failure(self, subject: Subject, e: BaseException, seconds: float) -> SubjectResult:
        """The result of a subject that stopped with `e` (preempted, or failed with a one-line message)."""
        out = join(self.opts.output, subject.id)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, DbbatchError):
            message = f"{type(e).__name__}: {message}{_advice(e)}"
        self.end_tracking(subject, e, message)
        if isinstance(e, Preempted):
            log.warning("%s: %s", subject.id, e)
            return SubjectResult(subject.id, "preempted", out, seconds=seconds, error_class="Preempted", message=str(e))
        log.error("%s: failed: %s", subject.id, message)
        drop_scratch_copies(SubjectRun.scratch(self, subject))
        if self.opts.debug or not isinstance(e, DbbatchError):
            log.debug("".join(traceback.format_exception(e)))
        return SubjectResult(subject.id, "failed", out, seconds=seconds, error_class=type(e).__name__, message=message)

    def reset_model(self) -> float:
        """Put the base model back as loaded for the next subject (methods.reset). Returns the seconds it took
        (bench/run.py reports them)."""
        from dbbatch.methods import reset

        started = time.monotonic()
        reset(self._model)
        return time.monotonic() - started

    def write_report(self, results: list[SubjectResult], extra: dict[str, Any]) -> dict[str, Any]:
        worker = self.leases.holder if self.leases else worker_identity(self.opts.run_id)
        report = {"run_id": self.opts.run_id, "output": self.opts.output, "base_model": self.manifest.base_model,
                  "worker": worker, "scratch": str(self.scratch), "subjects": [asdict(r) for r in results], **extra}
        try:
            self.storage.write_json(join(self.opts.output, "_runs", f"{self.opts.run_id}.json"), report)
        except DbbatchError as e:
            log.error("could not store the run report: %s", e)
        return report


class SubjectRun:
    """The stages of one subject. Attributes carry what one stage hands the next."""

    def __init__(self, batch: Batch, subject: Subject, out: str, lease: Optional[Lease] = None):
        self.b, self.s, self.out, self.lease = batch, subject, out, lease
        self.storage = batch.storage
        self.work = self.scratch(batch, subject)
        self.seconds: dict[str, float] = {}
        self.label = f"{subject.id} "

    @staticmethod
    def scratch(batch: Batch, subject: Subject) -> Path:
        """The subject's folder in this worker's scratch (removed with it when the batch ends)."""
        return batch.scratch / "subjects" / subject.id

    def tracking(self) -> Any:
        return self.b.tracking(self.s, self.out, self.lease.check if self.lease else None)

    def holds_lease(self, what: str) -> None:
        """Before any write to the subject's outputs: the lease is still ours (no I/O)."""
        if self.lease is not None:
            self.lease.check(what)

    def confirm_lease(self, what: str) -> None:
        """Before a write that decides the outcome: the lease is still ours, asked of the store."""
        if self.lease is not None:
            self.lease.verify(what)

    def _timed(self, phase: str, started: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.monotonic() - started, 3)

    def run(self) -> dict[str, Any]:
        stage = self.begin()
        if stage.get("stage") == "trained":  # the photos are not needed again: no download
            train_metrics = self.load_stored(stage)
        else:
            train_metrics = self.train_and_store(*self.inputs())
        return self.finish(train_metrics)

    def train_and_store(self, instance_images: list[Any], klass: Any) -> dict[str, Any]:
        """Train this subject alone, then store its model and the `trained` stage. Returns its train metrics."""
        signals.check(f"{self.s.id} before training")
        t = time.monotonic()
        train_metrics = self.train(instance_images, klass)
        self._timed("train", t)
        self.store_model(train_metrics)
        return train_metrics

    def begin(self) -> dict[str, Any]:
        """--force's deletion, the resolution, and the stored stage if it still matches (else {})."""
        if self.b.opts.force:
            self.confirm_lease("deleting its outputs for --force")
            self.storage.remove(self.out, recursive=True)
        model = self.b.model
        res = self.s.resolution or model.native_resolution
        from dbbatch.validation import resolution_step

        if res % resolution_step(model.vae_scale_factor):
            raise InputError(f"subject {self.s.id}: resolution {res} is not a multiple of {resolution_step(model.vae_scale_factor)} "
                             f"(diffusers renders multiples of 8; the model's VAE scale factor is {model.vae_scale_factor})")
        self.resolution = res
        from dbbatch.families import inapplicable

        for problem in inapplicable(model.family, self.s, f"subject {self.s.id}: ", self.b.manifest.base_model):
            raise InputError(problem)
        stage = self.storage.read_json(join(self.out, STAGE)) or {}
        if stage.get("stage") == "trained" and not self.stored_model_matches(stage):
            stage = {}
        return stage

    def load_stored(self, stage: dict[str, Any]) -> dict[str, Any]:
        log.info("%s: fine-tuned model already stored; loading it instead of training", self.s.id)
        t = time.monotonic()
        self.load_trained_weights()
        self._timed("load_trained", t)
        return stage["train"]

    def inputs(self) -> tuple[list[Any], Any]:
        """The instance photos (decoded) and the class latents (None without prior images)."""
        t = time.monotonic()
        instance_images = self.load_instance_images()
        self.store_photos(instance_images)
        self._timed("images", t)
        t = time.monotonic()
        from_images = self.s.priors.source == "images"
        klass = self.class_latents() if self.s.train.with_prior_preservation and from_images else None
        self._timed("priors", t)
        return instance_images, klass

    def store_photos(self, images: list[Any]) -> None:
        """photos.png: the photos as trained on, in one row (the batch report shows them beside the grid)."""
        from dbbatch.images import png_bytes
        from dbbatch.sampling import make_grid

        self.holds_lease("storing photos.png")
        self.storage.write_bytes(join(self.out, PHOTOS), png_bytes(make_grid(images, len(images))))

    def scorer(self, photos: list[Any], weights: Any = None, active: Any = None, current: Any = None, base: Any = None) -> Any:
        """The subject's Scorer (None without evaluation). It renders with the shared model inside `current()`
        (default: as it is), and with the base model inside `base()` (default: LoRA adapters switched off; none
        for a full fine-tune); `weights` defaults to the model's trainable parameters."""
        if not self.s.evaluation.enabled:
            return None
        from contextlib import nullcontext

        from dbbatch.methods import trained_weights
        from dbbatch.sampling import generate
        from dbbatch.scoring import Scorer, Target

        model, cfg = self.b.model, self.s.samples
        if base is None and self.s.train.method == "lora":
            from dbbatch.lora import adapters_off

            base = lambda: adapters_off(model.unet, *model.text_encoders)  # noqa: E731

        def inside(context: Any) -> Any:
            def render(prompts: list[str], seeds: list[int]) -> list[Any]:
                with context():
                    return generate(model, prompts, seeds, self.resolution, cfg.steps, cfg.guidance_scale,
                                    cfg.negative_prompt, cfg.batch_size, settings=model.family.settings_of(self.s))
            return render

        target = Target(self.s, photos, inside(current or nullcontext), weights or (lambda: trained_weights(model)),
                        inside(base) if base is not None else None, active or (lambda: True))
        t = time.monotonic()
        embedders = self.b.embedders(self.s)
        self._timed("load_evaluators", t)
        return Scorer(target, embedders, self.resolution, self.b.opts.run_id)

    def store_model(self, train_metrics: dict[str, Any]) -> None:
        """Upload the fine-tuned model, then record the `trained` stage (a rerun publishes without training)."""
        t = time.monotonic()
        train_metrics.update(self.publish_model(train_metrics.get("published_step", train_metrics["steps"])))
        self.confirm_lease(f"writing {STAGE}")
        self.storage.write_json(join(self.out, STAGE), {"stage": "trained", "train": train_metrics,
                                                        "fingerprint": self.fingerprint(stage=True),
                                                        "instance_listing": self.photo_listing()})
        self._timed("publish", t)

    def finish(self, train_metrics: dict[str, Any]) -> dict[str, Any]:
        """Samples, then config.yaml, metrics.json and `_SUCCESS`."""
        t = time.monotonic()
        self.samples()
        self._timed("sample", t)
        t = time.monotonic()
        metrics = self.publish_rest(train_metrics)
        self._timed("publish", t)
        try:  # the subject is published (_SUCCESS): nothing about its tracking may fail it now
            self.end_tracking(metrics)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: could not finish its tracking runs: %s", self.s.id, e)
        return metrics

    def end_tracking(self, metrics: dict[str, Any]) -> None:
        """The evaluation points, the grid and the outputs go to the subject's tracking runs, which then end."""
        runs = self.tracking()  # opened now when the model was stored by an earlier attempt
        self.b.tracked.pop(self.s.id, None)
        if not runs.loggers_by_service:
            return
        evaluation = metrics.get("evaluation") or {}
        runs.log_evaluation(evaluation)
        try:
            grid = self.storage.read_bytes(join(self.out, "samples", "grid.png"))
        except StorageError:
            grid = None
        runs.close("success", grid, {"steps": metrics.get("steps"), "final_loss": metrics.get("final_loss"),
                                     **({"published_step": evaluation.get("published_step"),
                                         "flags": evaluation.get("flags")} if evaluation else {})})

    # -- stages ---------------------------------------------------------------------------------------------------
    def photo_files(self, warn: bool = False) -> list[str]:
        from dbbatch.images import no_images_message, pick_image_files

        files, skipped = pick_image_files(self.storage.expand(self.s.images), self.s.images)
        for url in skipped if warn else ():
            log.warning("%s: skipping %s: not an image file name", self.s.id, url)
        if not files:
            raise ImageError(no_images_message(self.s.images))
        return files

    def photo_listing(self) -> str:
        """Digest of the photos' names, sizes and versions: tells an unchanged photo set without a download."""
        from dbbatch.storage import FileInfo, listing_digest

        return listing_digest(FileInfo(u, i.size, i.version) for u in self.photo_files() for i in [self.storage.info(u)])

    def load_instance_images(self) -> list[Any]:
        from dbbatch.fingerprints import images_digest
        from dbbatch.images import decode_all

        files = self.photo_files(warn=True)
        sums: list[bytes] = []

        def read(url: str) -> bytes:
            data = self._read_photo(url)
            sums.append(hashlib.sha256(data).digest())
            return data

        data = ((u, read(u)) for u in files)  # one file's bytes in memory at a time
        images, notes = decode_all(data, self.resolution)
        self.images_digest = images_digest(sums)
        for n in notes:
            log.warning("%s: %s", self.s.id, n)
        log.info("%s: %d instance image(s)", self.s.id, len(images))
        return images

    def _read_photo(self, url: str) -> bytes:
        try:
            return self.storage.read_bytes(url)
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # a photo the manifest names is missing: bad input
                raise ImageError(str(e)) from e
            raise

    def fingerprint(self, stage: bool = False) -> dict[str, Any]:
        """What a checkpoint (or, with `stage`, the stored model) must match to count as this run's."""
        from dbbatch.checkpoints import RESUME_SETTINGS
        from dbbatch.fingerprints import stage_fingerprint, subject_fingerprint

        model = self.b.model
        family = model.family.fingerprint(model.family.settings_of(self.s), self.resolution)
        if stage:
            return stage_fingerprint(self.s, self.resolution, model.identity, self.images_digest,
                                     self.b.manifest.output_dtype, self.s.model_format, family)
        return subject_fingerprint(self.s, self.resolution, model.identity, self.images_digest, RESUME_SETTINGS, family)

    def stored_model_matches(self, stage: dict[str, Any]) -> bool:
        """Whether the stored model was trained with this run's photos and settings. If not, say what changed
        and remove it (and the samples made from it), so the subject is trained again, never republished
        under a config.yaml that did not make it. The photos are read only when their listing changed."""
        from dbbatch.fingerprints import changes

        recorded = stage.get("fingerprint")
        if recorded is None:
            changed = ["its settings were not recorded (an older dbbatch stored it)"]
        else:
            try:
                listing = self.photo_listing()
            except (ImageError, StorageError) as e:  # photos removed once the model was stored: nothing to compare
                if isinstance(e, StorageError) and not isinstance(e.__cause__, FileNotFoundError):
                    raise
                log.warning("%s: cannot check the stored model against the photos (%s); comparing its settings only",
                            self.s.id, e)
                listing = stage.get("instance_listing")
            if stage.get("instance_listing") == listing:
                self.images_digest = recorded.get("instance_images")
            else:
                self.load_instance_images()
            changed = changes(recorded, self.fingerprint(stage=True))
        if not changed:
            return True
        log.warning("%s: the stored model was trained with other settings: %s; training again (its model/ and "
                    "samples/ are removed)", self.s.id, ", ".join(changed))
        self.confirm_lease("removing the outdated model")
        for name in (STAGE, "model", "lora", "samples"):
            self.storage.remove(join(self.out, name), recursive=name != STAGE)
        return False

    def class_latents(self) -> Any:
        from dbbatch.images import to_tensor
        from dbbatch.priors import ensure_priors, model_prior_spec, prior_key
        from dbbatch.training import latent_stats

        model = self.b.model
        settings = model.family.settings_of(self.s)
        spec = model_prior_spec(model, self.s.class_prompt, self.resolution, self.s.priors, settings)
        key = prior_key(spec) + f":{self.s.priors.num_images}"
        if key not in self.b._class_latents:
            images, generated = ensure_priors(
                model, self.s.class_prompt, self.resolution, self.s.priors, self.b.opts.prior_cache, self.storage,
                self.b.reporter, self.label, should_stop=lambda: signals.check(f"{self.s.id} during prior generation"),
                settings=settings,
            )
            self.priors_generated = generated
            self.b._class_latents[key] = latent_stats(model.vae, to_tensor(images))
        else:
            self.priors_generated = 0
        return self.b._class_latents[key]

    def train(self, instance_images: list[Any], klass: Any) -> dict[str, Any]:
        from dbbatch.checkpoints import StoreCheckpoints, pick_resume
        from dbbatch.images import to_tensor
        from dbbatch.methods import make_trainable
        from dbbatch.scoring import ScoreDuringTraining
        from dbbatch.training import DreamBoothModule, LatentPairs, TextInputs, device_count, fit, latent_stats, make_loader

        model, cfg = self.b.model, self.s.train
        if cfg.optimizer == "adamw8bit":
            from dbbatch.validation import adamw8bit_lacks

            if lacking := adamw8bit_lacks():
                raise InputError(f"subject {self.s.id}: train.optimizer adamw8bit needs {lacking}; use adamw")
        instance = latent_stats(model.vae, to_tensor(instance_images))
        prior_from_base = cfg.with_prior_preservation and self.s.priors.source == "base_model"
        if prior_from_base:
            klass = instance  # no class images: the class prompt on the instance latents (README: priors.source)
            self.priors_generated = 0
        with_class = klass is not None
        trainable = make_trainable(model, self.s)
        self.trainable_parameters = trainable.parameters
        family = model.family
        added = family.added_conditioning(family.settings_of(self.s), self.resolution)
        if trainable.text_encoders:
            ids = lambda p: family.tokenize(model.tokenizers, [p])  # noqa: E731
            text = TextInputs(ids(self.s.instance_prompt), ids(self.s.class_prompt) if with_class else None, True, added)
        else:
            text = TextInputs(model.encode([self.s.instance_prompt]), model.encode([self.s.class_prompt]) if with_class else None,
                              False, added)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        fingerprint = self.fingerprint()
        meta = {"base_model": model.identity, "subject": self.s.id, "train": cfg.model_dump(), "fingerprint": fingerprint}
        module = DreamBoothModule(model.unet, {name: getattr(model, name) for name in trainable.text_encoders}, text, cfg,
                                  model.scheduler_config, model.vae.config.scaling_factor, meta,
                                  adapters_only=trainable.adapters_only, prior_from_base=prior_from_base, family=family,
                                  encoders=model.text_encoders if trainable.text_encoders else ())
        loader = make_loader(LatentPairs(instance, klass), cfg.batch_size, cfg.seed)

        ckpt_remote = join(self.out, "checkpoints")
        self.confirm_lease("choosing a checkpoint (unusable ones are removed)")
        resume = pick_resume(self.storage, ckpt_remote, self.work / "resume", fingerprint, cfg, self.s.id)
        resume_path = str(resume.local) if resume else None
        resumed_from = resume.step if resume else None
        if resume is not None:
            log.info("%s: resuming from %s", self.s.id, resume.url)
        checkpointer = StoreCheckpoints(self.storage, ckpt_remote, self.work / "checkpoints", cfg.checkpoint_every,
                                        cfg.checkpoints_keep, cfg.max_steps, guard=self.lease.check if self.lease else None)
        scorer = self.scorer(instance_images)
        in_process = device_count(cfg.devices) == 1  # DDP ranks are other processes: scored after training instead
        if scorer is not None and not in_process and not resumed_from and scorer.scores.baseline is None:
            model.unet.eval()  # the base model's point, while the base weights are still here (scored after training)
            scorer.baseline(scorer.t.render_base or scorer.t.render)
        if scorer is not None and not in_process and self.s.evaluation.keep == "best":
            log.warning("%s: evaluation.keep best scores during training, which runs in one process; with %d devices only "
                        "the last step is scored and published (set train.devices: 1 to choose a best step)",
                        self.s.id, device_count(cfg.devices))
        scoring = (ScoreDuringTraining([scorer], cfg.max_steps),) if scorer is not None and in_process else ()
        task = self.b.reporter.start(f"{self.label}train", total=cfg.max_steps, unit="step") if self.b.reporter else None
        try:
            if task is not None and resumed_from:
                task.set(resumed_from)
            result = fit(module, loader, cfg, checkpointer, self.work / "logs", resume_path, task, self.s.id, scoring,
                         self.tracking().loggers(), self.b.manifest.tracking.tensorboard)
        finally:
            if task is not None:
                task.close()
            if cfg.gradient_checkpointing:
                model.unet.disable_gradient_checkpointing()
        model.to(self.b.device)  # Lightning's teardown moved the trained modules to the CPU
        losses = result.losses
        if not in_process:  # DDP ranks do not log to tracking services: the curve goes in now
            self.tracking().log_losses(losses, result.steps - len(losses))
        evaluated = self.evaluated(scorer, result.steps, scored_during=bool(scoring))
        return {**evaluated,
            "steps": result.steps, "final_loss": losses[-1] if losses else None,
            "mean_loss": sum(losses) / len(losses) if losses else None, "loss_curve": losses,
            "resumed_from_step": resumed_from, "checkpoint_seconds": result.checkpoint_seconds,
            "checkpoint_bytes": result.checkpoint_bytes, "priors_generated": getattr(self, "priors_generated", 0),
            "instance_images": len(instance_images), "method": cfg.method, "trainable_parameters": self.trainable_parameters,
        }

    def evaluated(self, scorer: Any, steps: int, scored_during: bool) -> dict[str, Any]:
        """After training: metrics.json's `evaluation` (scored now at the last step if it was not scored during
        training), with the best step's weights put into the model when evaluation.keep is best."""
        if scorer is None:
            return {}
        from dbbatch.methods import load_weights

        if not scored_during:
            self.b.model.unet.eval()
            if scorer.t.render_base is not None and scorer.scores.baseline is None:
                scorer.baseline(scorer.t.render_base)
            scorer.record(steps)
        entries, best = scorer.published(steps)
        if best is not None:
            load_weights(self.b.model, best)
        return entries

    def publish_model(self, steps: int) -> dict[str, Any]:
        """The fine-tuned model, uploaded before the stage is recorded: a diffusers folder (model/, full or delta)
        and, for LoRA, the adapters in lora/ (model/ then holds them merged in, with model_format full).
        Returns the output's size for metrics.json."""
        import torch

        from dbbatch.methods import text_encoders_trained
        from dbbatch.models import save_folder, save_delta

        model = self.b.model
        dtype = torch.float16 if self.b.manifest.output_dtype == "fp16" else None
        fmt, lora = self.s.model_format, self.s.train.method == "lora"
        folders: list[str] = []
        if lora:
            from dbbatch.lora_export import write_lora_folder

            write_lora_folder(model, self.s, self.work / "lora", steps, dtype, self.resolution)
            folders.append("lora")
        trained = text_encoders_trained(model, self.s)
        if fmt == "delta":
            save_delta(model, self.work / "model", trained, dtype)
            folders.append("model")
        elif fmt == "full":
            from diffusers import DDIMScheduler

            comps = {**model.parts(), "scheduler": DDIMScheduler.from_config(model.scheduler_config), "family": model.family}
            if lora:
                from dbbatch.lora import merged_copy

                comps.update({name: merged_copy(comps[name]) for name in ("unet", *trained)})
            save_folder(comps, self.work / "model", dtype)
            del comps
            folders.append("model")
        files = {f"{name}/{p.relative_to(self.work / name)}": p.stat().st_size
                 for name in folders for p in sorted((self.work / name).rglob("*")) if p.is_file()}
        for name in folders:
            self.holds_lease(f"uploading {name}/")
            self.storage.upload_tree(self.work / name, join(self.out, name))
        return {"output_bytes": sum(files.values()), "output_files": files}

    def load_trained_weights(self) -> None:
        from safetensors.torch import load_file

        from dbbatch.methods import text_encoders_trained

        model = self.b.model
        if self.s.train.method == "lora":
            from dbbatch.lora_export import DIFFUSERS_FILE, load_lora_folder

            local = self.storage.fetch(join(self.out, "lora", DIFFUSERS_FILE), self.work / "trained" / "lora" / DIFFUSERS_FILE)
            load_lora_folder(model, local.parent)
            return
        trained = ("unet", *text_encoders_trained(model, self.s))
        model.snapshot(trained)
        for name in trained:
            folder = join(self.out, "model", name)
            for url in self.storage.list_files(folder):
                if url.endswith(".safetensors"):
                    local = self.storage.fetch(url, self.work / "trained" / name / url.rsplit("/", 1)[-1])
                    state = load_file(str(local))
                    module = getattr(model, name)
                    ref = module.state_dict()
                    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)

    def samples(self) -> None:
        from PIL import Image

        from dbbatch.images import png_bytes
        from dbbatch.sampling import generate, make_grid

        cfg = self.s.samples
        prompts = self.s.sample_prompts()
        folder = join(self.out, "samples")
        names = [[f"prompt{r:02d}-seed{seed}.png" for seed in cfg.seeds] for r in range(len(prompts))]
        stored = {u.rsplit("/", 1)[-1] for u in self.storage.list_files(folder)}
        todo = [(r, c) for r in range(len(prompts)) for c in range(len(cfg.seeds)) if names[r][c] not in stored]
        task = self.b.reporter.start(f"{self.label}samples", total=len(todo), unit="img") if (self.b.reporter and todo) else None
        model = self.b.model
        model.unet.eval()

        made: dict[str, Image.Image] = {}

        def store(j: int, img: Image.Image, chunk: list[tuple[int, int]]) -> None:
            r, c = chunk[j]
            self.holds_lease("storing samples")
            self.storage.write_bytes(join(folder, names[r][c]), png_bytes(img))
            made[names[r][c]] = img
            if task:
                task.advance()

        for start in range(0, len(todo), cfg.batch_size):
            signals.check(f"{self.s.id} during sampling")
            chunk = todo[start : start + cfg.batch_size]
            generate(model, [prompts[r] for r, _ in chunk], [cfg.seeds[c] for _, c in chunk], self.resolution, cfg.steps,
                     cfg.guidance_scale, cfg.negative_prompt, cfg.batch_size, on_image=lambda j, img, ch=chunk: store(j, img, ch),
                     settings=model.family.settings_of(self.s))
        if task:
            task.close()
        # the grid: images made now from memory, those stored by an earlier attempt read back
        images = [made.get(n) or Image.open(io.BytesIO(self.storage.read_bytes(join(folder, n)))).convert("RGB")
                  for row in names for n in row]
        self.holds_lease("storing the sample grid")
        self.storage.write_bytes(join(folder, "grid.png"), png_bytes(make_grid(images, len(cfg.seeds))))
        self.storage.write_json(join(folder, "prompts.json"), {"rows": prompts, "columns": cfg.seeds, "files": names})

    def publish_rest(self, train_metrics: dict[str, Any]) -> dict[str, Any]:
        self.holds_lease("publishing logs, config.yaml and metrics.json")
        logs = getattr(self, "train_logs", self.work / "logs")  # a packed subject's are its cohort's
        if logs.exists():
            self.storage.upload_tree(logs, join(self.out, "logs"))
        faults.on_publish("config")
        config = {
            "subject": self.s.model_dump(mode="json"), "resolution": self.resolution,
            "base_model": self.b.manifest.base_model, "base_model_identity": self.b.model.identity,
            "output": self.b.opts.output, "output_dtype": self.b.manifest.output_dtype,
            "model_format": self.s.model_format,
            "storage_options": redact(self.b.manifest.storage_options),
        }
        self.storage.write_text(join(self.out, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
        metrics = {**train_metrics, "seconds": self.seconds, "versions": versions(), "run_id": self.b.opts.run_id,
                   "device": str(self.b.device), "resolution": self.resolution}
        self.storage.write_json(join(self.out, "metrics.json"), metrics)
        if self.s.train.method == "lora":
            self.model_card(train_metrics)
        self.confirm_lease(f"writing {SUCCESS}")
        self.storage.remove_partials(self.out)  # left by a killed earlier attempt; see Storage.remove_partials
        self.storage.write_text(join(self.out, SUCCESS), f"{self.b.opts.run_id}\n")
        faults.on_publish("success")
        # Done: resume state is dead weight now (for SD 1.5 several GB per subject), local scratch too.
        self.confirm_lease("deleting checkpoints")
        self.storage.remove(join(self.out, "checkpoints"), recursive=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return metrics


    def model_card(self, train_metrics: dict[str, Any]) -> None:
        """lora/README.md and the sample grid beside it: the folder is what a user uploads to a model hub."""
        from dbbatch.lora_export import model_card

        self.holds_lease("writing the model card")
        grid = join(self.out, "samples", "grid.png")
        self.storage.write_bytes(join(self.out, "lora", "grid.png"), self.storage.read_bytes(grid))
        files = {k.split("/", 1)[1]: v for k, v in train_metrics.get("output_files", {}).items() if k.startswith("lora/")}
        card = model_card(self.s, self.b.model, train_metrics.get("published_step", train_metrics["steps"]), files, "grid.png",
                          train_metrics.get("evaluation"), self.resolution)
        self.storage.write_text(join(self.out, "lora", "README.md"), card)


def _lease_outcome(result: Optional[SubjectResult]) -> tuple[str, Optional[str], Optional[str]]:
    """What a lease is released with after `result` (None: the work stopped before a result)."""
    outcome = {"succeeded": "done", "skipped": "done", "failed": "failed", "preempted": "preempted"}
    if result is None:
        return "released", None, None
    return outcome.get(result.status, "released"), result.message, result.error_class


SCRATCH_COPIES = ("resume", "checkpoints", "trained", "model", "model.tmp", "lora")


def drop_scratch_copies(work: Path) -> None:
    """After a subject failed: drop its scratch files that are copies of stored files or are useless to a
    rerun (checkpoint copies, the model written for upload), so a rerun on the same small disk has the room
    this attempt had. The TensorBoard logs stay: they are uploaded only when the subject is done."""
    for name in SCRATCH_COPIES:
        shutil.rmtree(work / name, ignore_errors=True)


def _advice(e: BaseException) -> str:
    """What to do about an error that is not ours (its message says what happened, not what to change)."""
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return ("; lower train.batch_size or resolution, or set train.gradient_checkpointing: true and "
                "train.mixed_precision: fp16 (or bf16)")
    return ""


def _host_tag() -> str:
    """This host's name with no '-' in it, so `<host>-<pid>-<run id>` splits back into its parts."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())


def scratch_dir(work_dir: Path, run_id: str) -> Path:
    """`<work_dir>/scratch/<host>-<pid>-<run id>`: this process's scratch, removed when the batch ends."""
    return work_dir / "scratch" / f"{_host_tag()}-{os.getpid()}-{run_id}"


def remove_orphan_scratch(work_dir: Path) -> None:
    """Remove the scratch of dead workers of this host (SIGKILLed, OOM-killed): a rerun on a small volume must
    not find its disk full of a dead run's checkpoint copies. Live pids (possibly reused) are left alone."""
    host = _host_tag()
    root = work_dir / "scratch"
    for folder in root.glob(f"{host}-*-*") if root.is_dir() else []:
        pid = folder.name[len(host) + 1 :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing the scratch of dead worker pid %s: %s", pid, folder)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
