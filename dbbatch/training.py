"""DreamBooth training with PyTorch Lightning: the loss, the cached-latent data set, the module, checkpoints.

The frozen parts run once, before training: the VAE encodes every instance and class image to its latent
distribution (mean, std), and, when the text encoder is frozen, the two prompts are embedded once. Each step
then samples latents from the cached distribution, so the VAE and a frozen text encoder are neither run
nor stored in checkpoints. All randomness of a step comes from one seeded generator whose state is saved in
every checkpoint, which makes resume-after-kill bitwise exact on CPU.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance MSE + prior_loss_weight x class MSE (Ruiz et al. 2023, eq. 2).

    `pred`/`target` hold the instance examples first, then the class examples (one batched forward).
    Returns (loss, instance_loss, prior_loss); with no class examples the prior term is zero.
    """
    inst = torch.nn.functional.mse_loss(pred[:num_instance].float(), target[:num_instance].float())
    if pred.shape[0] == num_instance:
        return inst, inst, torch.zeros((), device=pred.device)
    prior = torch.nn.functional.mse_loss(pred[num_instance:].float(), target[num_instance:].float())
    return inst + prior_loss_weight * prior, inst, prior


@torch.no_grad()
def latent_stats(vae: Any, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-encode images once -> (mean, std) of each latent distribution, on the CPU."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[i : i + batch_size].to(device=device, dtype=dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class LatentPairs(Dataset):
    """Item i: instance image i % N paired with class image i % M (as the reference trainer pairs them)."""

    def __init__(self, instance: tuple[torch.Tensor, torch.Tensor], klass: Optional[tuple[torch.Tensor, torch.Tensor]]):
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        return max(len(self.instance[0]), len(self.klass[0]) if self.klass else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self.instance[0])
        item = {"inst_mean": self.instance[0][i % n], "inst_std": self.instance[1][i % n]}
        if self.klass is not None:
            m = len(self.klass[0])
            item.update(cls_mean=self.klass[0][i % m], cls_std=self.klass[1][i % m])
        return item


def make_loader(dataset: LatentPairs, batch_size: int, seed: int):
    """A StatefulDataLoader: Lightning saves its position in checkpoints, so a resume continues mid-epoch."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                              generator=torch.Generator().manual_seed(seed), drop_last=False)


def rng_state() -> dict[str, Any]:
    """torch/numpy/python RNG states in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(pystate), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


@dataclass
class TextInputs:
    """Either cached embeddings (frozen text encoder) or token ids (trained text encoder)."""

    instance: torch.Tensor
    klass: Optional[torch.Tensor]
    are_ids: bool


class DreamBoothModule(pl.LightningModule):
    """Holds only what trains (UNet, and the text encoder when trained): its state_dict is the checkpoint."""

    def __init__(self, unet: Any, text_encoder: Optional[Any], text: TextInputs, train: Any,
                 scheduler_config: dict[str, Any], scaling_factor: float, meta: dict[str, Any]):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.text_encoder = text_encoder  # None unless trained: a frozen encoder stays out of checkpoints
        self.text = text
        self.cfg = train
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.scaling_factor = scaling_factor
        self.meta = meta
        self.noise_rng = torch.Generator().manual_seed(train.seed)
        self.losses: list[float] = []
        self.fault_step: Optional[int] = None  # test hook, see faults.py

    def _encoder_states(self, batch_size: int, with_class: bool) -> torch.Tensor:
        parts = [self.text.instance.expand(batch_size, *self.text.instance.shape[1:])]
        if with_class:
            parts.append(self.text.klass.expand(batch_size, *self.text.klass.shape[1:]))
        states = torch.cat(parts).to(self.device)
        if self.text.are_ids:
            states = self.text_encoder(states)[0]
        return states.to(self.unet.dtype)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from dbbatch import faults

        faults.on_train_step(self.global_step)
        with_class = "cls_mean" in batch
        mean, std = batch["inst_mean"], batch["inst_std"]
        n = mean.shape[0]
        if with_class:
            mean, std = torch.cat([mean, batch["cls_mean"]]), torch.cat([std, batch["cls_std"]])
        # Noise is drawn on the CPU from our own generator (saved in checkpoints), then moved to the device.
        g = self.noise_rng
        sample = torch.randn(mean.shape, generator=g)
        noise = torch.randn(mean.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (mean.shape[0],), generator=g)
        latents = ((mean.cpu() + std.cpu() * sample) * self.scaling_factor).to(self.device)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=self._encoder_states(n, with_class)).sample
        loss, inst, prior = dreambooth_loss(pred, target, n, self.cfg.prior_loss_weight)
        self.log_dict({"loss": loss, "instance_loss": inst, "prior_loss": prior}, on_step=True, prog_bar=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self._last_loss = loss.detach()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.losses.append(float(self._last_loss))

    def on_train_end(self) -> None:
        # Training is over. Lightning's teardown would now copy the optimizer state (twice the UNet's size), the
        # gradients and the modules to host memory, for the worker to move the modules straight back: on SD 1.5
        # ~10 GB each way per subject, seconds of copying and a host-memory peak that grew with every subject.
        # Free the state and gradients, and hand the modules back to their owner (the BaseModel) where they are.
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        for name in ("unet", "text_encoder"):
            module = getattr(self, name)
            if module is not None:
                module.zero_grad(set_to_none=True)
                setattr(self, name, None)

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        if self.text_encoder is not None:
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad],
                           "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
        kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb  # validated up front: installed and a GPU present

            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dbbatch"] = {
            "format": CHECKPOINT_FORMAT, **self.meta, "losses": list(self.losses),
            "noise_rng": self.noise_rng.get_state(), "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["dbbatch"]
        self.losses = list(state["losses"])
        self.noise_rng.set_state(state["noise_rng"])
        set_rng_state(state["rng"])


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    resumed_from_step: Optional[int]
    checkpoint_seconds: list[float]
    checkpoint_bytes: list[int]


def precision_of(mixed_precision: str) -> str:
    return {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[mixed_precision]


def fit(module: DreamBoothModule, loader: Any, train: Any, checkpointer: Any, log_dir: Any,
        resume_path: Optional[str], progress: Any = None) -> TrainResult:
    """Run (or resume) Lightning training for one subject. Preempted propagates after its checkpoint."""
    import warnings

    from pytorch_lightning.loggers import TensorBoardLogger

    # Lightning sets its own logger to INFO when imported; its device banners and tips are noise in a batch log.
    if not logging.getLogger("dbbatch").isEnabledFor(logging.DEBUG):
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    callbacks = [checkpointer]
    if progress is not None:
        callbacks.append(_ProgressCallback(progress))
    on_gpu = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not on_gpu:
        # Lightning quietly trains fp16 autocast as bf16 on a CPU (no fp16 loss scaling there): say so.
        log.warning("train.mixed_precision fp16 needs a GPU; training with bf16 autocast on this CPU instead")
    trainer = pl.Trainer(
        accelerator="auto", devices=train.devices, max_steps=train.max_steps, max_epochs=-1,
        precision=precision_of(train.mixed_precision), accumulate_grad_batches=train.gradient_accumulation,
        gradient_clip_val=train.max_grad_norm, callbacks=callbacks,
        logger=TensorBoardLogger(str(log_dir), name="", version=""), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(log_dir),
        # Bitwise-exact resume needs deterministic kernels; on GPUs speed wins (documented in README).
        deterministic=not on_gpu,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*set_vital.*")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_path, weights_only=True)
    return TrainResult(steps=trainer.global_step, losses=list(module.losses), resumed_from_step=None,
                       checkpoint_seconds=checkpointer.save_seconds, checkpoint_bytes=checkpointer.sizes)


class _ProgressCallback(pl.Callback):
    def __init__(self, task: Any):
        self.task = task

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = pl_module.losses[-1] if pl_module.losses else float("nan")
        self.task.set(trainer.global_step, loss=loss)
