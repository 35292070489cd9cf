"""The cached-latent data set and its loader: what one step sees, as a pure function of (seed, epoch, position).

The randomness of a sample (its latent draw, noise and timestep) is a pure function of (seed, epoch, position in
the epoch's order), so resume-after-kill is bitwise exact on CPU and the same samples get the same noise whether
one process or several DDP ranks train them.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader


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


def draws(keys: list[int], shape: tuple[int, ...],
          timestep: Callable[[torch.Generator], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent sample, noise, timestep) per example, each from a generator seeded by the example's key, on the
    CPU: independent of batch size, rank layout, device and of the other subjects packed beside it. `timestep`
    draws one from the generator (the family's scheme: `Family.draw_timestep`)."""
    samples, noises, steps = [], [], []
    for key in keys:
        g = torch.Generator().manual_seed(key)
        samples.append(torch.randn(shape, generator=g))
        noises.append(torch.randn(shape, generator=g))
        steps.append(timestep(g))
    return torch.stack(samples), torch.stack(noises), torch.cat(steps)


def noised_examples(family: Any, scheduler: Any, mean: torch.Tensor, std: torch.Tensor, keys: list[int],
                    scaling_factor: float, device: Any, shift_factor: float = 0.0,
                    settings: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, target, timesteps) of examples whose latent distributions are (mean, std), the randomness
    of example i from keys[i] (draws); the latents normalised as the VAE config says ((z - shift) x scale), the
    timesteps and objective the family's (`Family.draw_timestep`, `Family.noised`; `settings` its section)."""
    sample, noise, timesteps = draws(keys, tuple(mean.shape[1:]),
                                     lambda g: family.draw_timestep(g, scheduler, settings))
    latents = mean.cpu() + std.cpu() * sample
    if shift_factor:
        latents = latents - shift_factor
    latents = (latents * scaling_factor).to(device)
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy, target = family.noised(scheduler, latents, noise, timesteps, settings)
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
