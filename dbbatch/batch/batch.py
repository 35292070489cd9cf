"""One batch, one subject at a time: skip if done -> fetch -> priors -> train -> sample -> publish.

Every stage is idempotent and its results live in the output store, so a rerun (on any machine) redoes only
what is missing: `_SUCCESS` means done; `_stage.json` says the fine-tuned model is stored (a rerun samples
and publishes without training again); stored checkpoints resume training; stored priors and sample images
are not made again. `_SUCCESS` is always written last. One subject failing never stops the others."""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from dbbatch.batch.results import RunOptions, SubjectResult, lease_outcome
from dbbatch.batch.scratch import drop_scratch_copies, remove_orphan_scratch, scratch_dir
from dbbatch.batch.subject import SubjectRun
from dbbatch.config.manifest import Manifest, Subject
from dbbatch.core import faults, signals
from dbbatch.core.errors import DbbatchError, LeaseLost, Preempted
from dbbatch.store.layout import STAGE, SUCCESS
from dbbatch.store.leases import (
    Lease,
    LeaseGroup,
    Leases,
    describe,
    failed_since,
    holder_is_dead,
    holder_of,
    is_live,
    worker_identity,
)
from dbbatch.store.locations import join, redact
from dbbatch.store.storage import Storage

log = logging.getLogger(__name__)


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
        self._cleaned: set[str] = set()  # done subjects whose leftover checkpoints were looked for
        # Scratch of this process only: two workers sharing a work dir never touch each other's files.
        self.scratch = scratch_dir(options.work_dir, options.run_id)

    # -- the base model, once per process ---------------------------------------------------------------------
    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from dbbatch.models.loading import load_base_model

            started = time.monotonic()
            self._model = load_base_model(self.manifest.base_model, self.base_dir, self.opts.work_dir / "cache", self.storage)
            if self.manifest.base_dtype != "fp32":
                self._model.hold_in(self.manifest.base_dtype)
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._model.to(self.device)
            self.model_load_seconds = time.monotonic() - started
            log.info("base model %s loaded in %.1fs (identity %s)", self.manifest.base_model, self.model_load_seconds, self._model.identity)
        return self._model

    def embedders(self, subject: Subject) -> dict[str, Any]:
        """The subject's evaluation models (evaluation.clip, evaluation.dino), each loaded once per process."""
        from dbbatch.quality import evaluators

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
        from dbbatch.quality.tracking import Context, SubjectRuns

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
            from dbbatch.train.checkpoints import latest, step_of

            return f"resumable from step {step_of(latest(ckpts))}"
        return "pending"

    def run(self, subjects: list[Subject]) -> list[SubjectResult]:
        """Every subject once, in manifest order (packing: cohort by cohort, see config/packing.py). A subject leased by
        another worker is passed over and looked at again after each subject (or cohort) this worker finishes;
        when only such subjects are left, this worker waits until each is done (skipped), released (taken) or
        expired (taken over). So two workers on one output (a replacement pod beside a live one, or `--queue`
        pods) never train a subject twice, and no worker idles while an unleased subject remains."""
        from dbbatch.config.packing import cohorts

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
        from dbbatch.batch.cohorts import stored_cohorts

        return stored_cohorts(self.storage, self.opts.output)

    def attempt_cohort(self, group: Any, waiting_for: set[str]) -> dict[str, SubjectResult]:
        """Claim every member of a cohort that is not done and not leased by another worker, and train those
        together. Returns the results of the members it dealt with (none: all are held by others)."""
        from dbbatch.batch.cohorts import CohortRun

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
                    lease.release(*lease_outcome(results.get(subject.id)))
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
            lease.release(*lease_outcome(result))
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
        if subject.id not in self._cleaned:  # one listing per done subject and process
            self._cleaned.add(subject.id)
            self.remove_leftover_checkpoints(subject)
        return SubjectResult(subject.id, "skipped", out)

    def remove_leftover_checkpoints(self, subject: Subject) -> None:
        """A done subject's checkpoints, left when its publishing run could not remove them (an outage or a lost
        lease right after `_SUCCESS`): nothing resumes a done subject, and they can be gigabytes. The cost is one
        listing per done subject and run (a HEAD already tells it is done)."""
        folder = join(self.opts.output, subject.id, "checkpoints")
        try:
            if self.storage.list_files(folder, fresh=True):
                log.info("%s: removing the checkpoints its publishing run left in %s", subject.id, folder)
                self.storage.remove(folder, recursive=True)
        except DbbatchError as e:
            log.warning("%s: could not remove its leftover checkpoints (%s); the next run tries again", subject.id, e)

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
        from dbbatch.models.methods import reset

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


def _advice(e: BaseException) -> str:
    """What to do about an error that is not ours (its message says what happened, not what to change)."""
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return ("; lower train.batch_size or resolution, or set train.gradient_checkpointing: true and "
                "train.mixed_precision: fp16 (or bf16)")
    return ""
