"""Packed training: one Lightning step trains K subjects' LoRA adapters over one frozen base (models/packed_lora.py).

Each subject trains exactly as it would alone, by construction:
- its examples are the ones its solo run takes at that step: its own data order (EpochShuffle of its seed),
  its own latent draws, noise and timesteps (keyed as in data.py), its own epoch boundaries; a subject
  whose step holds fewer examples than the batch (an epoch's last, short batch) is padded with weight 0;
- the loss is the sum of each subject's own DreamBooth loss (a mean over its own examples), so the gradient of
  slot k is subject k's gradient, never a share of one mean over the packed batch;
- gradient clipping is per subject (each slot's norm over all its parameters); AdamW is element-wise, so one
  optimizer over the stacked parameters is K optimizers stepping together;
- a subject whose loss or gradient is non-finite fails alone: its slot is zeroed and frozen (parameters,
  gradients and optimizer state), the others go on, and the step it failed at is recorded.
The batch of a step is a pure function of the step number (CohortData), so resuming a checkpoint on the CPU is
bitwise exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from dbbatch.train.data import EpochShuffle, noised_examples, rng_state, set_rng_state
from dbbatch.train.module import CHECKPOINT_FORMAT, DreamBoothModule, cat_rows, rows


@dataclass
class Member:
    """One subject of a cohort, as the packed trainer sees it."""

    id: str
    seed: int
    instance: tuple[torch.Tensor, torch.Tensor]  # latent (mean, std) of its photos
    klass: Optional[tuple[torch.Tensor, torch.Tensor]]  # of its class images (or the photos, priors from the base)
    instance_states: dict[str, torch.Tensor]  # its instance prompt's conditioning (one row; frozen text encoders)
    class_states: Optional[dict[str, torch.Tensor]]


def variant() -> str:
    """Test-only (DBBATCH_FAULTS packing_variant=...): `batch_mean` (one mean over the packed batch) or
    `global_clip` (one clip over all subjects): the two mistakes the equivalence test must catch."""
    from dbbatch.core.faults import packing_variant

    return packing_variant()


class StepSampler(torch.utils.data.Sampler):
    """Yields the step numbers still to train: from the checkpoint's step (set on resume) to max_steps.

    Lightning sees one epoch of max_steps batches; resumed mid-epoch, it counts the batches of the checkpoint as
    done and expects the rest, which is what this yields (a length of what is left would end its epoch early
    and start another one from the resume step)."""

    def __init__(self, max_steps: int):
        self.max_steps, self.start = max_steps, 0

    def __len__(self) -> int:
        return self.max_steps

    def __iter__(self):
        return iter(range(self.start, self.max_steps))


class CohortData(Dataset):
    """Item `step`: every member's examples of that step, subject-major (member k's B instance examples, then
    its B class examples), with the weights that mark padding."""

    def __init__(self, members: list[Member], batch_size: int, scheduler: Any, scaling_factor: float, family: Any,
                 shift_factor: float = 0.0, settings: Any = None):
        self.members, self.batch_size, self.family, self.settings = members, batch_size, family, settings
        self.scheduler, self.scaling_factor, self.shift_factor = scheduler, scaling_factor, shift_factor
        self.with_class = members[0].klass is not None
        self.sizes = [max(len(m.instance[0]), len(m.klass[0]) if m.klass is not None else 0) for m in members]
        self.samplers = [EpochShuffle(n, m.seed) for n, m in zip(self.sizes, members)]
        self._orders: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return 2**62

    def _order(self, k: int, epoch: int) -> list[tuple[int, int]]:
        if (k, epoch) not in self._orders:
            if len(self._orders) > 4 * len(self.members):
                self._orders.clear()
            sampler = self.samplers[k]
            sampler.set_epoch(epoch)
            self._orders[(k, epoch)] = list(sampler)
        return self._orders[(k, epoch)]

    def positions(self, k: int, step: int) -> list[tuple[int, int]]:
        """Member k's (item index, noise key) pairs at `step`: the batch its solo run trains then (drop_last off,
        so an epoch ends with a short batch)."""
        per_epoch = math.ceil(self.sizes[k] / self.batch_size)
        epoch, b = divmod(step, per_epoch)
        return self._order(k, epoch)[b * self.batch_size : (b + 1) * self.batch_size]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        B = self.batch_size
        means, stds, keys, weights = [], [], [], []
        for k, m in enumerate(self.members):
            picked = self.positions(k, step)
            real = len(picked)
            picked = picked + [picked[0]] * (B - real)  # padding: weight 0, never in a loss or a gradient
            n = len(m.instance[0])
            idx = [i % n for i, _ in picked]
            means.append(m.instance[0][idx])
            stds.append(m.instance[1][idx])
            ks = [key for _, key in picked]
            keys += ks
            if self.with_class:
                c = len(m.klass[0])
                cidx = [i % c for i, _ in picked]
                means.append(m.klass[0][cidx])
                stds.append(m.klass[1][cidx])
                keys += [key + 1 for key in ks]
            weights.append([1.0] * real + [0.0] * (B - real))
        noisy, target, timesteps = noised_examples(self.family, self.scheduler, torch.cat(means), torch.cat(stds), keys,
                                                   self.scaling_factor, "cpu", self.shift_factor, self.settings)
        return {"noisy": noisy, "target": target, "timesteps": timesteps, "weights": torch.tensor(weights),
                "step": torch.tensor(step)}


class CohortModule(DreamBoothModule):
    """The packed trainer: the UNet with packed layers (the only trainable parameters) and the members."""

    def __init__(self, denoiser: Any, members: list[Member], train: Any, scheduler_config: dict[str, Any],
                 scaling_factor: float, meta: dict[str, Any], prior_from_base: bool = False, family: Any = None):
        from dbbatch.train.module import TextInputs

        empty = TextInputs(members[0].instance_states, members[0].class_states, are_ids=False)
        super().__init__(denoiser, {}, empty, train, scheduler_config, scaling_factor, meta, adapters_only=True,
                         prior_from_base=prior_from_base, family=family)
        self.members = members
        self.with_class = members[0].klass is not None
        B = train.batch_size
        per_member = cat_rows([c for m in members
                               for c in [rows(m.instance_states, B)] + ([rows(m.class_states, B)] if self.with_class else [])])
        self.cond_names = tuple(per_member)
        for name, value in per_member.items():  # buffers: they follow the module to its device
            self.register_buffer(f"cond_{name}", value.contiguous(), persistent=False)
        K = len(members)
        self.alive = [True] * K
        self.failed_at: list[Optional[int]] = [None] * K
        self.member_losses: list[list[float]] = [[] for _ in members]
        self.grad_norms: list[list[float]] = []  # per step, each member's norm before clipping (tests read it)
        self._losses: Optional[torch.Tensor] = None
        self.variant = variant()

    def setup(self, stage: str) -> None:
        pass  # one process: no DDP sharding

    def conditioning(self) -> dict[str, torch.Tensor]:
        """Every member's rows of conditioning, subject-major as the batch's examples."""
        return {name: getattr(self, f"cond_{name}") for name in self.cond_names}

    def _class_rows(self, x: torch.Tensor) -> torch.Tensor:
        K, B = len(self.members), self.cfg.batch_size
        return x.reshape(K, 2 * B, *x.shape[1:])[:, B:].reshape(K * B, *x.shape[1:])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from dbbatch.core import faults

        faults.on_train_step(int(batch["step"]))
        losses = self.member_loss(batch)
        self._losses = losses.detach()
        alive = torch.tensor(self.alive, device=losses.device)
        kept = torch.where(alive, losses, torch.zeros_like(losses))
        loss = kept.mean() if self.variant == "batch_mean" else kept.sum()
        values = losses.detach().cpu().tolist()
        for k, value in enumerate(values):
            if self.alive[k]:
                self.member_losses[k].append(value)
        live = [v for v, a in zip(values, self.alive) if a and math.isfinite(v)]
        self.losses.append(sum(live) / len(live) if live else float("nan"))
        self.log_dict({f"loss/{m.id}": float(v) for m, v, a in zip(self.members, values, self.alive) if a}, on_step=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def member_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each member's DreamBooth loss at this batch (K values), from one forward of the packed UNet."""
        from dbbatch.core import faults
        from dbbatch.models.packed_lora import packed_off

        step = int(batch["step"])
        K, B = len(self.members), self.cfg.batch_size
        noisy, target, timesteps, weights = batch["noisy"], batch["target"], batch["timesteps"], batch["weights"]
        if (bad := faults.nan_member(step)) is not None and bad in [m.id for m in self.members]:
            k = [m.id for m in self.members].index(bad)
            E = noisy.shape[0] // K
            noisy = noisy.clone()
            noisy[k * E : (k + 1) * E] = float("nan")
        if self.with_class and self.prior_from_base:
            with torch.no_grad(), packed_off(self.denoiser):
                base = self.family.predict(self.denoiser, self._class_rows(noisy), self._class_rows(timesteps),
                                           {k: self._class_rows(v) for k, v in self.conditioning().items()})
            target = target.reshape(K, 2 * B, *target.shape[1:]).clone()
            target[:, B:] = base.to(target.dtype).reshape(K, B, *base.shape[1:])
            target = target.reshape(K * 2 * B, *target.shape[2:])
        pred = self.family.predict(self.denoiser, noisy, timesteps, self.conditioning())
        per_example = (pred.float() - target.float()).pow(2).flatten(1).mean(1).reshape(K, -1)  # K x examples
        count = weights.sum(1)
        inst = (per_example[:, :B] * weights).sum(1) / count
        prior = (per_example[:, B:] * weights).sum(1) / count if self.with_class else torch.zeros_like(inst)
        return inst + self.cfg.prior_loss_weight * prior  # K: each subject's own DreamBooth loss

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Per-subject clipping (torch's clip_grad_norm_ applied to each slot), after finding subjects that failed."""
        from dbbatch.models.packed_lora import parameters

        params = [p for p in parameters(self.denoiser) if p.grad is not None]
        if not params:
            return
        K = len(self.members)
        norms = torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1) for p in params])  # P x K
        total = torch.linalg.vector_norm(norms, dim=0)  # K: each subject's gradient norm
        finite = torch.isfinite(self._losses.to(total.device))
        if self.trainer.precision != "16-mixed":  # under fp16 loss scaling an inf gradient is an overflow: the
            finite &= torch.isfinite(total)         # scaler skips that step (for every subject: one scale)
        self.grad_norms.append(total.detach().cpu().tolist())
        fresh = [k for k, ok in enumerate(finite.cpu().tolist()) if not ok and self.alive[k]]
        if fresh:
            self._fail(fresh, optimizer)
        if not all(self.alive):
            keep = torch.tensor(self.alive, device=total.device).view(K, 1, 1)
            for p in params:
                p.grad = torch.where(keep, p.grad, torch.zeros((), device=p.grad.device, dtype=p.grad.dtype))
            total = torch.where(keep.view(K), total, torch.zeros_like(total))
        if gradient_clip_val is None:
            return
        if self.variant == "global_clip":
            total = torch.linalg.vector_norm(total).expand(K)
        coef = torch.clamp(gradient_clip_val / (total + 1e-6), max=1.0).view(K, 1, 1)  # as clip_grad_norm_
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))

    def _fail(self, slots: list[int], optimizer: Any) -> None:
        """Zero and freeze the slots of subjects whose loss or gradient became non-finite."""
        from dbbatch.models.packed_lora import parameters

        step = self.global_step + 1
        for k in slots:
            self.alive[k], self.failed_at[k] = False, step
        with torch.no_grad():
            for p in parameters(self.denoiser):
                p[slots] = 0
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape[:1] == p.shape[:1] and value.dim() == p.dim():
                        value[slots] = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dbbatch"] = {
            "format": CHECKPOINT_FORMAT, **self.meta, "losses": list(self.losses),
            "member_losses": [list(x) for x in self.member_losses], "alive": list(self.alive),
            "failed_at": list(self.failed_at), "grad_norms": [list(n) for n in self.grad_norms], "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["dbbatch"]
        self.loader.sampler.start = int(checkpoint["global_step"])
        self.losses = list(state["losses"])
        self.member_losses = [list(x) for x in state["member_losses"]]
        self.alive, self.failed_at = list(state["alive"]), list(state["failed_at"])
        self.grad_norms = [list(n) for n in state["grad_norms"]]
        set_rng_state(state["rng"])


class StepLoader(torch.utils.data.DataLoader):
    """Its position is the trainer's step (restored from the checkpoint, see CohortModule.on_load_checkpoint);
    the state methods only tell Lightning that it resumes mid-epoch correctly."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def make_cohort_loader(data: CohortData, max_steps: int) -> Any:
    return StepLoader(data, batch_size=None, sampler=StepSampler(max_steps), num_workers=0)


def slice_checkpoint(path: os.PathLike, keep: list[int], out: os.PathLike) -> None:
    """Write to `out` the cohort checkpoint at `path` with only the slots `keep` (in that order): the adapters,
    their AdamW moments and the per-member records. Every other part of the state is shared by the slots alike
    (step counts, the LR schedule, RNG states), and AdamW and per-subject clipping are per slot, so the kept
    members continue exactly as they would have in the larger cohort."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    K = len(ckpt["dbbatch"]["members"])
    index = torch.tensor(keep)
    ckpt["state_dict"] = {k: v.index_select(0, index) for k, v in ckpt["state_dict"].items()}
    for opt in ckpt.get("optimizer_states", []):
        for state in opt["state"].values():
            for name, value in list(state.items()):
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == K:
                    state[name] = value.index_select(0, index)
    meta = ckpt["dbbatch"]
    for name in ("members", "member_losses", "alive", "failed_at"):
        meta[name] = [meta[name][k] for k in keep]
    meta["grad_norms"] = [[norms[k] for k in keep] for norms in meta["grad_norms"]]
    meta["fingerprints"] = {m: meta["fingerprints"][m] for m in meta["members"]}
    torch.save(ckpt, out)
