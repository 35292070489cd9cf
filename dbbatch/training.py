"""DreamBooth training with PyTorch Lightning: the loss, the cached-latent data set, the module, checkpoints.

The frozen parts run once, before training: the VAE encodes every instance and class image to its latent
distribution (mean, std), and, when the text encoder is frozen, the two prompts are embedded once. Each step
then samples latents from the cached distribution, so the VAE and a frozen text encoder are neither run
nor stored in checkpoints. The randomness of a sample (its latent draw, noise and timestep) is a pure function
of (seed, epoch, position in the epoch's order), so resume-after-kill is bitwise exact on CPU and the same
samples get the same noise whether one process or several DDP ranks train them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 3  # 2: per-sample noise keys replace the saved noise generator; 3: a fingerprint (fingerprints.py)


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
    """Item i: instance image i % N paired with class image i % M (as the reference trainer pairs them).

    Indexed with (i, noise_key) pairs from EpochShuffle; the key travels with the item to training_step."""

    def __init__(self, instance: tuple[torch.Tensor, torch.Tensor], klass: Optional[tuple[torch.Tensor, torch.Tensor]]):
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        return max(len(self.instance[0]), len(self.klass[0]) if self.klass else 0)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, key = index
        n = len(self.instance[0])
        item = {"inst_mean": self.instance[0][i % n], "inst_std": self.instance[1][i % n],
                "noise_key": torch.tensor(key, dtype=torch.int64)}
        if self.klass is not None:
            m = len(self.klass[0])
            item.update(cls_mean=self.klass[0][i % m], cls_std=self.klass[1][i % m])
        return item


def draws(keys: list[int], shape: tuple[int, ...], num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent sample, noise, timestep) per example, each from a generator seeded by the example's key, on the
    CPU: independent of batch size, rank layout, device and of the other subjects packed beside it."""
    samples, noises, steps = [], [], []
    for key in keys:
        g = torch.Generator().manual_seed(key)
        samples.append(torch.randn(shape, generator=g))
        noises.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
    return torch.stack(samples), torch.stack(noises), torch.cat(steps)


def noised_examples(family: Any, scheduler: Any, mean: torch.Tensor, std: torch.Tensor, keys: list[int],
                    scaling_factor: float, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, target, timesteps) of examples whose latent distributions are (mean, std), the randomness
    of example i from keys[i] (draws); the objective is the family's (`Family.noised`)."""
    sample, noise, timesteps = draws(keys, tuple(mean.shape[1:]), scheduler.config.num_train_timesteps)
    latents = ((mean.cpu() + std.cpu() * sample) * scaling_factor).to(device)
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy, target = family.noised(scheduler, latents, noise, timesteps)
    return noisy, target, timesteps


def noise_key(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample's randomness, from (seed, epoch, position in the epoch's order); even, < 2**57,
    so key + 1 (the class example's seed) is distinct from every other key."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=7).digest()
    return 2 * int.from_bytes(digest, "big")


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch that depends only on (seed, epoch), dealt round-robin to `world` DDP ranks.

    Lightning calls `set_epoch` at each epoch start with the epoch restored from a checkpoint, and the
    StatefulDataLoader skips the batches already yielded in that epoch, so after a resume the order is exactly
    the uninterrupted one. (A generator carried across epochs, as in torchdata's stateful RandomSampler, came
    back in a different state after a mid-epoch resume here: the next epoch's order diverged.)

    Under DDP (`shard`), rank r takes positions r, r+W, r+2W, ... so that optimizer step k of W ranks with
    batch B trains exactly positions [kBW, (k+1)BW) of the epoch, the same samples as one process with batch
    BW. The order is padded to a multiple of W with its first positions (as torch's DistributedSampler does)
    so every rank runs the same number of steps; only then does an epoch differ from the one-process run.
    Each item is (dataset index, noise_key of its position).
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g).tolist()
        total = len(self) * self.world
        order = (order * (-(-total // self.num_items)))[:total]
        return iter([(order[p], noise_key(self.seed, self.epoch, p)) for p in range(self.rank, total, self.world)])


class ConsumedPositionLoader(StatefulDataLoader):
    """A StatefulDataLoader whose saved position is the batches training consumed, not fetched.

    Lightning's training loop fetches one batch ahead (to know an epoch's last batch), so the plain loader
    state in a mid-epoch checkpoint is one batch ahead of training, and a resume would skip a batch (seen here:
    the first step after a resume differed). This loader remembers its state after each batch it hands out;
    the module counts the batches that reached training_step and saves the matching state.
    """

    def __iter__(self):
        inner = super().__iter__()
        self.states_after = {0: StatefulDataLoader.state_dict(self)}  # batches handed out -> loader state
        self.consumed = 0

        def batches():
            for n, batch in enumerate(inner, start=1):
                self.states_after[n] = StatefulDataLoader.state_dict(self)
                yield batch

        return batches()

    def mark_consumed(self) -> None:
        self.states_after.pop(self.consumed, None)  # only this and later positions can still be saved
        self.consumed += 1

    def consumed_state_dict(self) -> dict[str, Any]:
        return self.states_after[self.consumed]


def make_loader(dataset: LatentPairs, batch_size: int, seed: int) -> ConsumedPositionLoader:
    return ConsumedPositionLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed),
                                  num_workers=0, drop_last=False)


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
    """The instance and class prompts: either their cached conditioning ({name: tensor}, one row; frozen text
    encoders) or their token ids (one tensor per tokenizer; a text encoder trains). `added`: the conditioning
    that is not the prompt (SDXL's size ids), one row."""

    instance: Any
    klass: Optional[Any]
    are_ids: bool
    added: dict[str, torch.Tensor] = field(default_factory=dict)


def rows(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """A one-row conditioning repeated for n examples (a view)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def cat_rows(conds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class DreamBoothModule(pl.LightningModule):
    """Holds only what trains (UNet, and the text encoders that train): its state_dict is the checkpoint.

    With `adapters_only` (LoRA) the state_dict is the trainable parameters alone (the adapters), so a
    checkpoint holds no base weights. With `prior_from_base` the class examples' target is the frozen base
    model's own prediction (the adapters switched off) instead of the noise of a class image.
    `encoders`: with token ids, every text encoder of the family in its order (those not in `trained` are
    frozen and stay out of checkpoints)."""

    def __init__(self, unet: Any, trained: dict[str, Any], text: TextInputs, train: Any,
                 scheduler_config: dict[str, Any], scaling_factor: float, meta: dict[str, Any],
                 adapters_only: bool = False, prior_from_base: bool = False, family: Any = None,
                 encoders: Sequence[Any] = ()):
        super().__init__()
        self.adapters_only, self.prior_from_base = adapters_only, prior_from_base
        from diffusers import DDPMScheduler

        from dbbatch import families

        self.family = family or families.by_name("sd")
        self.unet = unet
        self.trained_names = tuple(trained)
        for name, module in trained.items():  # registered under the component's name: checkpoint keys
            setattr(self, name, module)
        self.encoders = list(encoders)  # a plain list: frozen ones are not registered, so not in checkpoints
        self.text = text
        self.cfg = train
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.scaling_factor = scaling_factor
        self.meta = meta
        self.losses: list[float] = []
        self.loader: Any = None  # set by fit(): its consumed position goes into checkpoints

    def _prompt(self, which: Any) -> dict[str, torch.Tensor]:
        if self.text.are_ids:
            cond = self.family.encode(self.encoders, which)
        else:
            cond = which
        return {**{k: v.to(self.device) for k, v in cond.items()}, **{k: v.to(self.device) for k, v in self.text.added.items()}}

    def _conditioning(self, batch_size: int, with_class: bool, only_class: bool = False) -> dict[str, torch.Tensor]:
        parts = [] if only_class else [rows(self._prompt(self.text.instance), batch_size)]
        if with_class:
            parts.append(rows(self._prompt(self.text.klass), batch_size))
        return cat_rows(parts)

    def _trained_encoders(self) -> list[Any]:
        return [getattr(self, name) for name in self.trained_names]

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        state = super().state_dict(*args, **kwargs)
        if not self.adapters_only:
            return state
        keep, prefix = self._trainable_names(), kwargs.get("prefix", "")
        for key in [k for k in state if k[len(prefix):] not in keep]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if not self.adapters_only:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        keep = self._trainable_names()
        missing, unexpected = sorted(keep - set(state_dict)), sorted(set(state_dict) - keep)
        if missing or unexpected:  # the fingerprint check refuses other shapes first; this is the backstop
            raise RuntimeError(f"the checkpoint's adapters do not fit this model: {len(missing)} missing "
                               f"({missing[:1]}), {len(unexpected)} unexpected ({unexpected[:1]})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def _base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The frozen base model's prediction for the class prompt: the class examples' target."""
        from dbbatch.lora import adapters_off

        with torch.no_grad(), adapters_off(self.unet, *(self.encoders if self.text.are_ids else ())):
            cond = self._conditioning(batch_size, True, only_class=True)
            return self.family.predict(self.unet, noisy, timesteps, cond)

    def setup(self, stage: str) -> None:
        if self.loader is not None:  # runs in every rank: each one trains its share of the samples
            self.loader.sampler.shard(self.global_rank, self.trainer.world_size)

    def on_fit_start(self) -> None:
        # The module is on its device now (in a DDP rank too); frozen text encoders are not registered
        # submodules, so they follow by hand (SDXL training the first encoder and not the second).
        for encoder in self.encoders:
            encoder.to(self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from dbbatch import faults

        faults.on_train_step(self.global_step)
        if self.loader is not None:
            self.loader.mark_consumed()
        with_class = "cls_mean" in batch
        mean, std = batch["inst_mean"], batch["inst_std"]
        n = mean.shape[0]
        if with_class:
            mean, std = torch.cat([mean, batch["cls_mean"]]), torch.cat([std, batch["cls_std"]])
        keys = [int(k) for k in batch["noise_key"]]
        if with_class:
            keys += [k + 1 for k in keys]
        noisy, target, timesteps = noised_examples(self.family, self.noise_scheduler, mean, std, keys, self.scaling_factor,
                                                   self.device)
        if faults.nan_member(self.global_step) == self.meta.get("subject"):
            noisy = noisy * float("nan")
        if with_class and self.prior_from_base:
            target = torch.cat([target[:n], self._base_prediction(noisy[n:], timesteps[n:], n).to(target.dtype)])
        pred = self.family.predict(self.unet, noisy, timesteps, self._conditioning(n, with_class))
        loss, inst, prior = dreambooth_loss(pred, target, n, self.cfg.prior_loss_weight)
        # Under DDP each rank's loss covers its share of the batch; the mean over ranks is the loss of the whole
        # (ranks hold equally many examples) and what DDP's averaged gradient descends. Identity in one process.
        # torch.stack copies: the all-reduce must not write into the loss that backward still needs.
        loss_r, inst_r, prior_r = self.trainer.strategy.reduce(torch.stack([loss, inst, prior]).detach(), reduce_op="mean")
        self.log_dict({"loss": loss_r, "instance_loss": inst_r, "prior_loss": prior_r}, on_step=True, prog_bar=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        # Recorded here, not in on_train_batch_end: checkpoint callbacks run before the module's own hook.
        if not torch.isfinite(loss_r):
            from dbbatch.errors import TrainingDiverged

            raise TrainingDiverged(f"subject {self.meta.get('subject')}: the loss became non-finite at step {self.global_step + 1}; "
                                   "lower train.learning_rate (or set train.max_grad_norm) and check its photos")
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.losses.append(float(loss_r))
        return loss


    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:
            return  # a spawned DDP rank: it exits now, and rank 0's weights are still to be sent back (ddp.py)
        # Training is over. Lightning's teardown would now copy the optimizer state (twice the UNet's size), the
        # gradients and the modules to host memory, for the worker to move the modules straight back: on SD 1.5
        # ~10 GB each way per subject, seconds of copying and a host-memory peak that grew with every subject.
        # Free the state and gradients, and hand the modules back to their owner (the BaseModel) where they are.
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        for name in ("unet", *self.trained_names):
            module = getattr(self, name)
            if module is not None:
                module.zero_grad(set_to_none=True)
                setattr(self, name, None)
        self.encoders = []

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        if self.trained_names:
            groups.append({"params": [p for m in self._trained_encoders() for p in m.parameters() if p.requires_grad],
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
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        sampler_epoch = self.current_epoch
        if self.loader is not None and fit_state.get("combined_loader"):
            position = self.loader.consumed_state_dict()
            if position["_num_yielded"] >= len(self.loader):
                # Saved after an epoch's last batch: Lightning resumes with the next epoch, so the loader must
                # start that epoch afresh (its "end of epoch" state would make the next epoch look empty).
                fit_state["combined_loader"] = []
                sampler_epoch += 1
            else:
                fit_state["combined_loader"] = [position]
        checkpoint["dbbatch"] = {
            "format": CHECKPOINT_FORMAT, **self.meta, "losses": list(self.losses),
            "rng": rng_state(), "sampler_epoch": sampler_epoch,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["dbbatch"]
        if self.loader is not None:
            # Lightning fetches the first batch after a resume before it calls set_epoch: give the sampler
            # the checkpoint's epoch now, or that batch would come from epoch 0's order.
            self.loader.sampler.set_epoch(state["sampler_epoch"])
        self.losses = list(state["losses"])
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
    `loggers`: tracking runs (tracking.py) beside the TensorBoard log in `log_dir` (off with `tensorboard`
    False); with DDP they are left out (the caller logs the loss curve when training ends).

    With more than one device, only this fit runs in DDP ranks spawned here (see dbbatch/ddp.py); each rank
    trains train.batch_size examples per micro-batch, so the effective batch is devices x batch_size."""
    import warnings

    from pytorch_lightning.loggers import TensorBoardLogger

    from dbbatch import signals

    module.loader = loader
    callbacks = [*before_checkpoints, checkpointer]
    on_gpu = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not on_gpu:
        # Lightning quietly trains fp16 autocast as bf16 on a CPU (no fp16 loss scaling there): say so.
        log.warning("train.mixed_precision fp16 needs a GPU; training with bf16 autocast on this CPU instead")
    distributed = device_count(train.devices) > 1
    strategy: Any = "auto"
    if distributed:
        from dbbatch.ddp import ProgressToMain, SpawnDDP

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
        except Exception as e:
            if launcher is None:
                raise
            from dbbatch.errors import Preempted

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
