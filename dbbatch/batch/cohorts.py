"""One cohort of packed subjects, end to end: inputs -> one packed training -> each subject published alone.

The cohort's checkpoints live under the output, `<output>/_cohorts/<cohort id>/` (with `cohort.json`, its
members), so any pod can resume it. Each member holds its own lease for the whole training (all renewed while
the cohort trains); a member whose inputs are bad fails before training, alone; a member whose loss diverges
fails alone (train/packed_training.py). After training, member k's slot is copied into an ordinary peft adapter and
published by the same code as a solo LoRA subject (its `_SUCCESS` written last), then its lease is given back.
The cohort's folder is removed once every member is published.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from dbbatch.batch.results import lease_outcome
from dbbatch.batch.subject import SubjectRun
from dbbatch.config.packing import Cohort, StoredCohort
from dbbatch.core import signals
from dbbatch.core.errors import CheckpointError, Preempted, TrainingDiverged
from dbbatch.store.layout import SUCCESS
from dbbatch.store.locations import join
from dbbatch.train.checkpoints import latest, read_meta, restart_reason, step_of

log = logging.getLogger(__name__)
COHORTS = "_cohorts"
INFO = "cohort.json"


def cohort_folder(output: str, cohort_id: str) -> str:
    return join(output, COHORTS, cohort_id)


def stored_cohorts(storage: Any, output: str) -> list[StoredCohort]:
    """The cohorts with a checkpoint stored in `output` (one listing, one small read per cohort)."""
    files = [f.rel for f in storage.list_tree(join(output, COHORTS))]
    found = []
    for info in [r for r in files if r.count("/") == 1 and r.endswith("/" + INFO)]:
        name = info.split("/", 1)[0]
        step = step_of(latest([r for r in files if r.startswith(name + "/checkpoints/")]) or "")
        doc = storage.read_json(join(output, COHORTS, info)) or {}
        if step is not None and doc.get("members"):
            found.append(StoredCohort(name, tuple(doc["members"]), step))
    return found


class CohortRun:
    """The members of one cohort (each a SubjectRun with its lease) through begin, inputs, packed training and
    publishing. `run` returns each member's SubjectResult."""

    def __init__(self, batch: Any, cohort: Cohort, claimed: list[tuple[Any, Any]]):
        self.b, self.cohort = batch, cohort
        self._members([SubjectRun(batch, s, join(batch.opts.output, s.id), lease) for s, lease in claimed])

    def check_leases(self, what: str) -> None:
        for r in self.runs:
            r.holds_lease(what)

    def run(self) -> dict[str, Any]:
        from dbbatch.core import faults

        results: dict[str, Any] = {}
        ready = []
        for r in self.runs:  # bad inputs fail their subject alone, before training
            started = time.monotonic()
            faults.set_subject(r.s.id)
            try:
                stage = r.begin()
                if stage.get("stage") == "trained":  # published model, unpublished rest: no training needed
                    results[r.s.id] = self.b.outcome(r.s, lambda r=r, stage=stage: r.finish(r.load_stored(stage)))
                    continue
                r.instance_images, r.klass = r.inputs()
                ready.append(r)
            except Exception as e:  # noqa: BLE001 - one subject never sinks the cohort
                results[r.s.id] = self.b.failure(r.s, e, time.monotonic() - started)
            finally:
                faults.set_subject(None)
        if not ready:
            return results
        if len(ready) < len(self.runs):
            self._members(ready)
        return {**results, **self.run_ready()}

    def _members(self, runs: list[Any]) -> None:
        self.runs, self.ids = runs, [r.s.id for r in runs]
        self.id = Cohort([r.s for r in runs]).id
        self.folder = cohort_folder(self.b.opts.output, self.id)
        self.work = self.b.scratch / "cohorts" / self.id

    def run_ready(self) -> dict[str, Any]:
        """Train the members whose inputs are loaded, then publish each."""
        if reason := self.unpackable():
            log.warning("cohort %s: %s; its subjects train one at a time", self.id, reason)
            return {r.s.id: self.b.outcome(r.s, lambda r=r: r.finish(r.train_and_store(r.instance_images, r.klass)))
                    for r in self.runs}
        started = time.monotonic()
        try:
            signals.check(f"cohort {self.id} before training")
            trained = self.train()
        except Exception as e:  # noqa: BLE001 - preempted, or failed: every member alike
            seconds = time.monotonic() - started
            return {r.s.id: self.b.failure(r.s, e, seconds) for r in self.runs}
        finally:
            self.b.reset_model()
        train_seconds = time.monotonic() - started
        results = {}
        for r, (state, metrics) in zip(self.runs, trained):
            if signals.requested():  # preempted while publishing: the rest publish from their stored checkpoint later
                results[r.s.id] = self.b.failure(r.s, Preempted(f"{signals.name()} received before {r.s.id} was published"),
                                                 train_seconds)
                continue
            if isinstance(metrics, Exception):
                results[r.s.id] = self.b.failure(r.s, metrics, train_seconds)
                continue
            r.seconds["train"] = round(train_seconds, 3)  # the cohort's, shared by its members
            results[r.s.id] = self.b.outcome(r.s, lambda r=r, state=state, metrics=metrics: self._publish(r, state, metrics))
            results[r.s.id].seconds += train_seconds
            if r.lease is not None:
                r.lease.release(*lease_outcome(results[r.s.id]))
        if all(res.status == "succeeded" or res.error_class == "TrainingDiverged" for res in results.values()):
            self.remove_finished()  # nothing left that its checkpoint could still publish
        shutil.rmtree(self.work, ignore_errors=True)
        return results

    def unpackable(self) -> Optional[str]:
        """Why these members cannot train packed here after all (known only with the model and the devices)."""
        from dbbatch.models.lora import adaptable_layers, resolve_targets
        from dbbatch.models.packed_lora import packable_problem
        from dbbatch.train.fit import device_count

        cfg, unet = self.runs[0].s.train, self.b.model.denoiser
        if device_count(cfg.devices) > 1:
            return f"packed training runs on one device, and train.devices gives {device_count(cfg.devices)}"
        names, _ = resolve_targets(adaptable_layers(unet), cfg.lora.target)
        return packable_problem({n: unet.get_submodule(n) for n in names})

    def _publish(self, r: Any, state: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        from dbbatch.models.lora import attach, load_adapter_state

        model = self.b.model
        attach(model, r.s.train.lora, r.s.train.seed, r.s.id)
        load_adapter_state(model.denoiser, state)
        r.publish.store_model(metrics)
        return r.finish(metrics)

    def remove_finished(self) -> None:
        """This cohort's folder, and the stored cohort it resumed from once none of its members still needs it."""
        self.check_leases("removing the cohort's checkpoints")
        self.b.storage.remove(self.folder, recursive=True)
        old = self.cohort.resumes
        if old is not None and old.id != self.id:
            waiting = [m for m in old.members if m not in self.ids
                       and not self.b.storage.exists(join(self.b.opts.output, m, SUCCESS), fresh=True)]
            if not waiting:
                self.b.storage.remove(cohort_folder(self.b.opts.output, old.id), recursive=True)

    # -- training ---------------------------------------------------------------------------------------------
    def train(self) -> list[tuple[dict[str, Any], Any]]:
        """One packed training of the members: per member (its adapter state, its train metrics) or (None,
        the TrainingDiverged that failed it)."""
        from dbbatch.models.lora import adaptable_layers, adapter_state, attach, detach, resolve_targets
        from dbbatch.models.packed_lora import attach_packed, detach_packed, only_slot, packed_off, slot_state
        from dbbatch.quality.scoring import ScoreDuringTraining
        from dbbatch.train.checkpoints import StoreCheckpoints
        from dbbatch.train.data import latent_stats
        from dbbatch.train.fit import fit
        from dbbatch.train.images import to_tensor
        from dbbatch.train.packed_training import CohortData, CohortModule, Member, make_cohort_loader

        model, runs = self.b.model, self.runs
        cfg = runs[0].s.train
        names, _ = resolve_targets(adaptable_layers(model.denoiser), cfg.lora.target)
        prior_from_base = cfg.with_prior_preservation and runs[0].s.priors.source == "base_model"
        members, initial = [], []
        for r in runs:
            instance = latent_stats(model.vae, to_tensor(r.instance_images))
            klass = instance if prior_from_base else r.klass
            if prior_from_base:
                r.priors_generated = 0
            with_class = klass is not None
            added = model.family.added_conditioning(model.family.settings_of(r.s), r.resolution)
            members.append(Member(r.s.id, r.s.train.seed, instance, klass if with_class else None,
                                  {**model.encode([r.s.instance_prompt]), **added},
                                  {**model.encode([r.s.class_prompt]), **added} if with_class else None))
            attach(model, r.s.train.lora, r.s.train.seed, r.s.id)  # slot k starts as subject k's own fresh adapter
            initial.append({k: v.detach().cpu() for k, v in adapter_state(model.denoiser).items()})
            detach(model)
        model.freeze()
        per_subject = attach_packed(model.denoiser, initial, names, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        model.denoiser.train()
        if cfg.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()
        try:
            fingerprints = {r.s.id: r.fingerprint() for r in runs}
            meta = {"base_model": model.identity, "cohort": self.id, "members": self.ids, "fingerprints": fingerprints,
                    "train": cfg.model_dump(mode="json")}
            settings = model.family.settings_of(runs[0].s)  # the same in every member (config/packing.py's shape)
            module = CohortModule(model.denoiser, members, cfg, model.scheduler_config, model.vae.config.scaling_factor,
                                  meta, prior_from_base=prior_from_base, family=model.family)
            loader = make_cohort_loader(CohortData(members, cfg.batch_size, module.noise_scheduler,
                                                   model.vae.config.scaling_factor, model.family,
                                                   model.latent_shift, settings), cfg.max_steps)
            scorers = [r.evaluate.scorer(r.instance_images, weights=lambda k=k: slot_state(model.denoiser, k),
                                         active=lambda k=k: bool(module.alive[k]), current=lambda k=k: only_slot(model.denoiser, k),
                                         base=lambda: packed_off(model.denoiser)) for k, r in enumerate(runs)]
            scoring = [s for s in scorers if s is not None]
            self.check_leases("choosing a checkpoint")
            resume = self.pick_resume(fingerprints, cfg.max_steps)
            self.b.storage.write_json(join(self.folder, INFO), {"cohort": self.id, "members": self.ids})
            checkpointer = StoreCheckpoints(self.b.storage, join(self.folder, "checkpoints"), self.work / "checkpoints",
                                            cfg.checkpoint_every, cfg.checkpoints_keep, cfg.max_steps, guard=self.check_leases)
            reporter = self.b.reporter
            started = time.monotonic()
            task = reporter.start(f"{self.id} ({len(runs)}) train", total=cfg.max_steps, unit="step") if reporter else None
            try:
                if task is not None and resume:
                    task.set(resume[1])
                tracked = [lg for r in runs for lg in r.tracking().loggers(members=tuple(self.ids))]
                result = fit(module, loader, cfg, checkpointer, self.work / "logs", str(resume[0]) if resume else None,
                             task, self.id, (ScoreDuringTraining(scoring, cfg.max_steps),) if scoring else (), tracked,
                             self.b.manifest.tracking.tensorboard)
            finally:
                if task is not None:
                    task.close()
            model.to(self.b.device)
            out = []
            for k, r in enumerate(runs):
                if not module.alive[k]:
                    out.append((None, TrainingDiverged(
                        f"subject {r.s.id}: the loss became non-finite at step {module.failed_at[k]} in {self.id} "
                        f"(K={len(runs)}; the others went on); lower train.learning_rate and check its photos")))
                    continue
                losses = module.member_losses[k]
                evaluated, best = scorers[k].published(result.steps) if scorers[k] is not None else ({}, None)
                state = best if best is not None else slot_state(model.denoiser, k)
                out.append((state, {**evaluated,
                    "steps": result.steps, "final_loss": losses[-1] if losses else None,
                    "mean_loss": sum(losses) / len(losses) if losses else None, "loss_curve": losses,
                    "resumed_from_step": resume[1] if resume else None, "checkpoint_seconds": result.checkpoint_seconds,
                    "checkpoint_bytes": result.checkpoint_bytes, "priors_generated": getattr(r, "priors_generated", 0),
                    "instance_images": len(r.instance_images), "method": "lora", "trainable_parameters": per_subject,
                    "grad_norm_curve": [round(n[k], 6) for n in module.grad_norms],  # before clipping
                    "cohort": {"id": self.id, "size": len(runs), "members": self.ids, "slot": k,
                               "train_seconds": round(time.monotonic() - started, 3)}}))
                r.train_logs = self.work / "logs"
            return out
        finally:
            if cfg.gradient_checkpointing:
                model.denoiser.disable_gradient_checkpointing()
            detach_packed(model.denoiser)

    def pick_resume(self, fingerprints: dict[str, dict[str, Any]], max_steps: int) -> Optional[tuple[Path, int]]:
        """(local checkpoint, step) to resume, or None. The checkpoint comes from this cohort's folder or from the
        stored cohort this one is part of (cut to these members: packed_training.slice_checkpoint). One whose
        members changed is refused with the reason; then every member trains from step 0."""
        from dbbatch.train.packed_training import slice_checkpoint

        source = self.cohort.resumes
        if self.b.opts.force:  # --force redoes the subjects: nothing of an earlier training is resumed
            self.b.storage.remove(join(self.folder, "checkpoints"), recursive=True)
            return None
        folders = [self.folder] + ([cohort_folder(self.b.opts.output, source.id)] if source and source.id != self.id else [])
        storage = self.b.storage
        for folder in folders:
            stored = sorted(((step_of(u), u) for u in storage.list_files(join(folder, "checkpoints")) if step_of(u) is not None),
                            reverse=True)
            for step, url in stored:
                local = storage.fetch(url, self.work / "resume" / url.rsplit("/", 1)[-1])
                try:
                    meta = read_meta(local, url)
                except CheckpointError as e:
                    log.warning("%s: %s; trying the next older checkpoint", self.id, e)
                    continue
                members = list(meta.get("members") or [])
                missing = [m for m in self.ids if m not in members]
                reasons = [f"{m} was not in it" for m in missing]
                for m in [m for m in self.ids if m in members]:
                    why = restart_reason({**meta, "fingerprint": meta["fingerprints"].get(m, {})}, fingerprints[m], max_steps, step)
                    if why:
                        reasons.append(f"subject {m}: {why}")
                if reasons:
                    log.warning("%s: not resuming checkpoint %s (step %d): %s; the cohort %s trains from step 0",
                                self.id, url, step, "; ".join(reasons), ", ".join(self.ids))
                    if folder == self.folder:  # ours: its old steps would outrank the new run's checkpoints
                        for _, other in stored:
                            storage.remove(other)
                    return None
                if members != self.ids:
                    cut = local.with_name(f"cut-{local.name}")
                    slice_checkpoint(local, [members.index(m) for m in self.ids], cut)
                    log.info("%s: resuming %s of stored %s (%d subjects) at step %d", self.id, ", ".join(self.ids),
                             meta.get("cohort"), len(members), step)
                    return cut, step
                log.info("%s: resuming from %s", self.id, url)
                return local, step
        return None
