"""Build the `RunContext` once from the environment: SLURM_PROCID/SLURM_NTASKS, else RANK/WORLD_SIZE,
else rank 0 of 1. Nothing deeper in the project reads these variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from stages.base import RunContext


def rank_and_world(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    for rank_var, world_var in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank_var in env and world_var in env:
            rank, world = int(env[rank_var]), int(env[world_var])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} is not in [0, {world_var}={world})")
            return rank, world
    return 0, 1


def context_from_env(root: Path, seed: int, force: bool = False,
                     env: Mapping[str, str] = os.environ) -> RunContext:
    rank, world = rank_and_world(env)
    return RunContext(root=Path(root), rank=rank, world_size=world, seed=seed, force=force)
