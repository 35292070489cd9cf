"""Which subjects a shard (one Kubernetes Job index) processes. Pure.

A subject belongs to shard `int(sha256(id)) mod count`: every subject lands in exactly one shard, the
answer depends only on the subject's own id, so appending subjects to a manifest never moves existing ones
(which may be half trained in some pod) to another shard. With a few dozen subjects per shard the hash
spreads them evenly enough; it does not balance by training cost.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

T = TypeVar("T")


def shard_of(subject_id: str, shard_count: int) -> int:
    if shard_count < 1:
        raise ValueError(f"shard count must be >= 1, got {shard_count}")
    return int.from_bytes(hashlib.sha256(subject_id.encode("utf-8")).digest()[:8], "big") % shard_count


def select(ids: Sequence[str], shard_index: int, shard_count: int) -> list[str]:
    """The ids in shard `shard_index` of `shard_count`, in their original order."""
    if shard_count < 1:
        raise ValueError(f"shard count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard index must be in [0, {shard_count}), got {shard_index}")
    return [i for i in ids if shard_of(i, shard_count) == shard_index]
