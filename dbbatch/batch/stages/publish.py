"""Publish: the fine-tuned model (model/, lora/) and the `trained` stage, then config.yaml, metrics.json, the
model card and `_SUCCESS`, written last; and the subject's tracking runs, closed once it is published.

A rerun that finds the `trained` stage loads the stored weights (`load_trained`) instead of training again.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from typing import Any

import yaml

from dbbatch import __version__
from dbbatch.batch.stages.context import SubjectContext
from dbbatch.core import faults
from dbbatch.core.errors import DbbatchError, StorageError
from dbbatch.store.layout import STAGE, SUCCESS
from dbbatch.store.locations import join, redact

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"dbbatch": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "pytorch-lightning", "torchdata"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class Publish:
    def __init__(self, ctx: SubjectContext, photo_listing: Any):
        self.c, self.photo_listing = ctx, photo_listing

    def store_model(self, train_metrics: dict[str, Any]) -> None:
        """Upload the fine-tuned model, then record the `trained` stage (a rerun publishes without training)."""
        c = self.c
        t = time.monotonic()
        train_metrics.update(self.model(train_metrics.get("published_step", train_metrics["steps"])))
        c.confirm_lease(f"writing {STAGE}")
        c.storage.write_json(join(c.out, STAGE), {"stage": "trained", "train": train_metrics,
                                                  "fingerprint": c.fingerprint(stage=True),
                                                  "instance_listing": self.photo_listing()})
        c.timed("publish", t)

    def model(self, steps: int) -> dict[str, Any]:
        """The fine-tuned model, uploaded before the stage is recorded: a diffusers folder (model/, full or delta)
        and, for LoRA, the adapters in lora/ (model/ then holds them merged in, with model_format full).
        Returns the output's size for metrics.json."""
        import torch

        from dbbatch.models.loading import save_delta, save_folder
        from dbbatch.models.methods import text_encoders_trained

        c = self.c
        model = c.b.model
        dtype = torch.float16 if c.b.manifest.output_dtype == "fp16" else None
        fmt, lora = c.s.model_format, c.s.train.method == "lora"
        folders: list[str] = []
        if lora:
            from dbbatch.models.lora_export import write_lora_folder

            write_lora_folder(model, c.s, c.work / "lora", steps, dtype, c.resolution)
            folders.append("lora")
        trained = text_encoders_trained(model, c.s)
        if fmt == "delta":
            save_delta(model, c.work / "model", trained, dtype)
            folders.append("model")
        elif fmt == "full":
            comps = {**model.parts(), "scheduler": model.family.sampling_scheduler(model.scheduler_config),
                     "family": model.family}
            if lora:
                from dbbatch.models.lora import merged_copy

                comps.update({name: merged_copy(comps[name]) for name in (model.family.denoiser, *trained)})
            save_folder(comps, c.work / "model", dtype)
            del comps
            folders.append("model")
        files = {f"{name}/{p.relative_to(c.work / name)}": p.stat().st_size
                 for name in folders for p in sorted((c.work / name).rglob("*")) if p.is_file()}
        for name in folders:
            c.holds_lease(f"uploading {name}/")
            c.storage.upload_tree(c.work / name, join(c.out, name))
        return {"output_bytes": sum(files.values()), "output_files": files}

    def load_trained(self) -> None:
        """The stored fine-tuned weights into the shared model (a rerun after the `trained` stage)."""
        from safetensors.torch import load_file

        from dbbatch.models.methods import text_encoders_trained

        c = self.c
        model = c.b.model
        if c.s.train.method == "lora":
            from dbbatch.models.lora_export import DIFFUSERS_FILE, load_lora_folder

            local = c.storage.fetch(join(c.out, "lora", DIFFUSERS_FILE), c.work / "trained" / "lora" / DIFFUSERS_FILE)
            load_lora_folder(model, local.parent)
            return
        trained = (model.family.denoiser, *text_encoders_trained(model, c.s))
        model.snapshot(trained)
        for name in trained:
            folder = join(c.out, "model", name)
            for url in c.storage.list_files(folder):
                if url.endswith(".safetensors"):
                    local = c.storage.fetch(url, c.work / "trained" / name / url.rsplit("/", 1)[-1])
                    state = load_file(str(local))
                    module = getattr(model, name)
                    ref = module.state_dict()
                    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)

    def rest(self, train_metrics: dict[str, Any]) -> dict[str, Any]:
        """Logs, config.yaml, metrics.json, the model card, then `_SUCCESS`; then the checkpoints and scratch go."""
        c = self.c
        c.holds_lease("publishing logs, config.yaml and metrics.json")
        logs = getattr(c, "train_logs", c.work / "logs")  # a packed subject's are its cohort's
        if logs.exists():
            c.storage.upload_tree(logs, join(c.out, "logs"))
        faults.on_publish("config")
        config = {
            "subject": c.s.model_dump(mode="json"), "resolution": c.resolution,
            "base_model": c.b.manifest.base_model, "base_model_identity": c.b.model.identity,
            "output": c.b.opts.output, "output_dtype": c.b.manifest.output_dtype,
            "base_dtype": c.b.manifest.base_dtype, "model_format": c.s.model_format,
            "storage_options": redact(c.b.manifest.storage_options),
        }
        c.storage.write_text(join(c.out, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
        metrics = {**train_metrics, "seconds": c.seconds, "versions": versions(), "run_id": c.b.opts.run_id,
                   "device": str(c.b.device), "resolution": c.resolution}
        c.storage.write_json(join(c.out, "metrics.json"), metrics)
        if c.s.train.method == "lora":
            self.model_card(train_metrics)
        c.confirm_lease(f"writing {SUCCESS}")
        c.storage.remove_partials(c.out)  # left by a killed earlier attempt; see Storage.remove_partials
        c.storage.write_text(join(c.out, SUCCESS), f"{c.b.opts.run_id}\n")
        faults.on_publish("success")
        # Done: resume state is dead weight now (for SD 1.5 several GB per subject), local scratch too. The subject
        # is published whatever happens here: an outage or a lost lease leaves the checkpoints for the next run
        # that finds the subject done (Batch.skipped_as_done), and never turns a published subject into a failed one.
        try:
            c.confirm_lease("deleting checkpoints")
            c.storage.remove(join(c.out, "checkpoints"), recursive=True)
        except DbbatchError as e:
            log.warning("%s: published; its checkpoints were not removed (%s); the next run removes them", c.s.id, e)
        shutil.rmtree(c.work, ignore_errors=True)
        return metrics

    def model_card(self, train_metrics: dict[str, Any]) -> None:
        """lora/README.md and the sample grid beside it: the folder is what a user uploads to a model hub."""
        from dbbatch.models.lora_export import model_card

        c = self.c
        c.holds_lease("writing the model card")
        grid = join(c.out, "samples", "grid.png")
        c.storage.write_bytes(join(c.out, "lora", "grid.png"), c.storage.read_bytes(grid))
        files = {k.split("/", 1)[1]: v for k, v in train_metrics.get("output_files", {}).items() if k.startswith("lora/")}
        card = model_card(c.s, c.b.model, train_metrics.get("published_step", train_metrics["steps"]), files, "grid.png",
                          train_metrics.get("evaluation"), c.resolution)
        c.storage.write_text(join(c.out, "lora", "README.md"), card)

    def end_tracking(self, metrics: dict[str, Any]) -> None:
        """The evaluation points, the grid and the outputs go to the subject's tracking runs, which then end."""
        c = self.c
        runs = c.tracking()  # opened now when the model was stored by an earlier attempt
        c.b.tracked.pop(c.s.id, None)
        if not runs.loggers_by_service:
            return
        evaluation = metrics.get("evaluation") or {}
        runs.log_evaluation(evaluation)
        try:
            grid = c.storage.read_bytes(join(c.out, "samples", "grid.png"))
        except StorageError:
            grid = None
        runs.close("success", grid, {"steps": metrics.get("steps"), "final_loss": metrics.get("final_loss"),
                                     **({"published_step": evaluation.get("published_step"),
                                         "flags": evaluation.get("flags")} if evaluation else {})})
