"""The DreamBooth Lightning module: the loss with prior preservation, the step, its checkpointed state.

The frozen parts run once, before training: the VAE encodes every instance and class image to its latent
distribution (data.py), and, when the text encoder is frozen, the two prompts are embedded once. Each step
then samples latents from the cached distribution, so the VAE and a frozen text encoder are neither run nor
stored in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch

from dbbatch.train.data import noised_examples, rng_state, set_rng_state

CHECKPOINT_FORMAT = 3  # 2: per-sample noise keys replace the saved noise generator; 3: a fingerprint (store/fingerprints.py)


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

    def __init__(self, denoiser: Any, trained: dict[str, Any], text: TextInputs, train: Any,
                 scheduler_config: dict[str, Any], scaling_factor: float, meta: dict[str, Any],
                 adapters_only: bool = False, prior_from_base: bool = False, family: Any = None,
                 encoders: Sequence[Any] = (), shift_factor: float = 0.0, family_settings: Any = None):
        super().__init__()
        self.adapters_only, self.prior_from_base = adapters_only, prior_from_base
        from dbbatch.models import families

        self.family = family or families.by_name("sd")
        setattr(self, self.family.denoiser, denoiser)  # its component name: the checkpoint's keys ("unet.")
        self.trained_names = tuple(trained)
        for name, module in trained.items():  # registered under the component's name: checkpoint keys
            setattr(self, name, module)
        self.encoders = list(encoders)  # a plain list: frozen ones are not registered, so not in checkpoints
        self.text = text
        self.cfg = train
        self.noise_scheduler = self.family.training_scheduler(scheduler_config)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.family_settings = family_settings
        self.meta = meta
        self.losses: list[float] = []
        self.loader: Any = None  # set by fit(): its consumed position goes into checkpoints

    @property
    def denoiser(self) -> Any:
        return getattr(self, self.family.denoiser)

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
        from dbbatch.models.lora import adapters_off

        with torch.no_grad(), adapters_off(self.denoiser, *(self.encoders if self.text.are_ids else ())):
            cond = self._conditioning(batch_size, True, only_class=True)
            return self.family.predict(self.denoiser, noisy, timesteps, cond)

    def setup(self, stage: str) -> None:
        if self.loader is not None:  # runs in every rank: each one trains its share of the samples
            self.loader.sampler.shard(self.global_rank, self.trainer.world_size)

    def on_fit_start(self) -> None:
        # The module is on its device now (in a DDP rank too); frozen text encoders are not registered
        # submodules, so they follow by hand (SDXL training the first encoder and not the second).
        for encoder in self.encoders:
            encoder.to(self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from dbbatch.core import faults

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
                                                   self.device, self.shift_factor, self.family_settings)
        if faults.nan_member(self.global_step) == self.meta.get("subject"):
            noisy = noisy * float("nan")
        if with_class and self.prior_from_base:
            target = torch.cat([target[:n], self._base_prediction(noisy[n:], timesteps[n:], n).to(target.dtype)])
        pred = self.family.predict(self.denoiser, noisy, timesteps, self._conditioning(n, with_class))
        loss, inst, prior = dreambooth_loss(pred, target, n, self.cfg.prior_loss_weight)
        # Under DDP each rank's loss covers its share of the batch; the mean over ranks is the loss of the whole
        # (ranks hold equally many examples) and what DDP's averaged gradient descends. Identity in one process.
        # torch.stack copies: the all-reduce must not write into the loss that backward still needs.
        loss_r, inst_r, prior_r = self.trainer.strategy.reduce(torch.stack([loss, inst, prior]).detach(), reduce_op="mean")
        self.log_dict({"loss": loss_r, "instance_loss": inst_r, "prior_loss": prior_r}, on_step=True, prog_bar=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        # Recorded here, not in on_train_batch_end: checkpoint callbacks run before the module's own hook.
        if not torch.isfinite(loss_r):
            from dbbatch.core.errors import TrainingDiverged

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
        for name in (self.family.denoiser, *self.trained_names):
            module = getattr(self, name)
            if module is not None:
                module.zero_grad(set_to_none=True)
                setattr(self, name, None)
        self.encoders = []

    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        groups = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
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
