"""Shard names (`000042`), listing of finished shards and the deterministic rank split.

Output paths are a pure function of (folder, unit): `images/000042.tar`, `images/_done/000042.json`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, TypeVar

SHARD_DIGITS = 6
_SHARD_RE = re.compile(r"^\d{%d,}$" % SHARD_DIGITS)

T = TypeVar("T")


def shard_name(index: int) -> str:
    """`42 -> "000042"`; indexes past a million simply grow wider."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{index:0{SHARD_DIGITS}d}"


def shard_names(count: int) -> list[str]:
    """`shard_name(i)` for i in range(count), without a call per name (400,000 units: 0.1 s)."""
    return [f"{i:0{SHARD_DIGITS}d}" for i in range(count)]


def is_shard_name(name: str) -> bool:
    return bool(_SHARD_RE.match(name))


def shard_index(name: str) -> int:
    if not is_shard_name(name):
        raise ValueError(f"not a shard name: {name!r}")
    return int(name)


def list_shards(folder: Path, suffix: str) -> list[str]:
    """Shard names of `folder/<name><suffix>` files, sorted by index."""
    names = [p.name[: -len(suffix)] for p in Path(folder).glob(f"*{suffix}")]
    return sorted((n for n in names if is_shard_name(n)), key=int)


def rank_split(units: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Units `rank, rank + world_size, ...` of the full, ordered list.

    The split is over all units, not just the pending ones, so every rank computes the same
    assignment whatever the others have finished meanwhile: no unit is taken twice or skipped.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return list(units[rank::world_size])
