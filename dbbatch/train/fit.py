"""One `trainer.fit` of a module (solo or packed) with dbbatch's checkpoints, progress, loggers and devices."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch

from dbbatch.train.module import DreamBoothModule

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    resumed_from_step: Optional[int]
    checkpoint_seconds: list[float]
    checkpoint_bytes: list[int]


def precision_of(mixed_precision: str) -> str:
    return {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[mixed_precision]


def _quiet_lightning() -> None:
    """Lightning's INFO banners ("GPU available: ...", "TPU available: ...", the "Tip: ... litlogger" advert) and a
    few known-harmless warnings are noise in a batch log (also run in DDP ranks). Importing pytorch_lightning
    sets its logger to INFO, whatever the CLI set before, and the banners come from Trainer(): so this runs
    after the import and before the Trainer is made."""
    import warnings

    if not logging.getLogger("dbbatch").isEnabledFor(logging.DEBUG):
        for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*is smaller than the logging interval.*",
                    ".*exists and is not empty.*", ".*LeafSpec.*", ".*set_vital.*"):
        warnings.filterwarnings("ignore", message)


def device_count(devices: Any) -> int:
    """What Lightning's accelerator="auto" makes of train.devices: every visible GPU for "auto", else 1 CPU."""
    if devices != "auto":
        return int(devices)
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def fit(module: DreamBoothModule, loader: Any, train: Any, checkpointer: Any, log_dir: Any,
        resume_path: Optional[str], progress: Any = None, subject_id: Optional[str] = None,
        before_checkpoints: tuple[Any, ...] = (), loggers: Sequence[Any] = (), tensorboard: bool = True) -> TrainResult:
    """Run (or resume) Lightning training for one subject. Preempted propagates after its checkpoint.
    `before_checkpoints`: callbacks whose step-end work a checkpoint of that step must include (scoring).
    `loggers`: tracking runs (quality/tracking.py) beside the TensorBoard log in `log_dir` (off with `tensorboard`
    False); with DDP they are left out (the caller logs the loss curve when training ends).

    With more than one device, only this fit runs in DDP ranks spawned here (see dbbatch/train/ddp.py); each rank
    trains train.batch_size examples per micro-batch, so the effective batch is devices x batch_size."""
    import warnings

    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from dbbatch.core import signals

    module.loader = loader
    callbacks = [*before_checkpoints, checkpointer]
    on_gpu = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not on_gpu:
        # Lightning quietly trains fp16 autocast as bf16 on a CPU (no fp16 loss scaling there): say so.
        log.warning("train.mixed_precision fp16 needs a GPU; training with bf16 autocast on this CPU instead")
    distributed = device_count(train.devices) > 1
    strategy: Any = "auto"
    if distributed:
        from dbbatch.train.ddp import ProgressToMain, SpawnDDP

        strategy = SpawnDDP(subject_id, logging.getLogger("dbbatch").getEffectiveLevel(), _quiet_lightning)
        module.cpu()  # ranks take their copy from the CPU; the main process keeps none on GPU 0
        if progress is not None:
            callbacks.append(ProgressToMain(None))  # its queue is the launcher's, set below
    elif progress is not None:
        callbacks.append(_ProgressCallback(progress))
    pl.seed_everything(train.seed, workers=True, verbose=False)  # global RNGs too, so runs are reproducible
    _quiet_lightning()
    trainer = pl.Trainer(
        accelerator="auto", devices=train.devices, strategy=strategy, max_steps=train.max_steps, max_epochs=-1,
        precision=precision_of(train.mixed_precision), accumulate_grad_batches=train.gradient_accumulation,
        gradient_clip_val=train.max_grad_norm, callbacks=callbacks,
        logger=[*([TensorBoardLogger(str(log_dir), name="", version="")] if tensorboard else []),
                *(() if distributed else loggers)] or False, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(log_dir),
        # Our EpochShuffle shards the data itself (Lightning's DistributedSamplerWrapper would hide its epoch).
        use_distributed_sampler=False,
        # Bitwise-exact resume needs deterministic kernels; on GPUs speed wins (documented in README).
        deterministic=not on_gpu,
    )
    launcher = trainer.strategy.launcher if distributed else None
    relay = None
    if launcher is not None and progress is not None:
        callbacks[-1].queue = launcher.progress
        relay = launcher.relay_progress(progress)
    with warnings.catch_warnings():
        _quiet_lightning()
        try:
            trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_path, weights_only=True)
        except SIGTERMException:
            # Lightning's own stop on SIGTERM, a SystemExit that would end the process with exit 0 and no run
            # report. StoreCheckpoints raises Preempted first at every step boundary; this is the rest.
            from dbbatch.core.errors import Preempted

            raise Preempted(f"{signals.name()} received; stopped during training (its last stored checkpoint "
                            "resumes it)") from None
        except Exception as e:
            if launcher is None:
                raise
            from dbbatch.core.errors import Preempted

            original = launcher.rank_error()  # a rank's DbbatchError (or OOM), not the spawn wrapper's text
            if original is not None:
                raise original from None
            if signals.requested():
                raise Preempted("SIGTERM received; stopped while starting training processes") from None
            raise RuntimeError(f"a training process failed: {e}") from e
        finally:
            if launcher is not None:
                if relay is not None:
                    launcher.stop_relay(relay)
                launcher.cleanup()
    steps = launcher.results["global_step"] if launcher is not None else trainer.global_step
    return TrainResult(steps=steps, losses=list(module.losses), resumed_from_step=None,
                       checkpoint_seconds=checkpointer.save_seconds, checkpoint_bytes=checkpointer.sizes)


class _ProgressCallback(pl.Callback):
    def __init__(self, task: Any):
        self.task = task

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = pl_module.losses[-1] if pl_module.losses else float("nan")
        self.task.set(trainer.global_step, loss=loss)
