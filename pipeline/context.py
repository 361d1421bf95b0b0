"""Build the `RunContext` once from the environment. Nothing deeper in the project reads these variables.

Order: torchrun's RANK/WORLD_SIZE inside a launched step (LOCAL_RANK set: under srun + torchrun,
SLURM_PROCID counts nodes, not processes); then SLURM tasks, times the job-array task when the job is
an array (rank = array index * SLURM_NTASKS + SLURM_PROCID); then RANK/WORLD_SIZE; else rank 0 of 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from stages.base import RunContext
from stages.errors import StageConfigError


def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StageConfigError(f"environment variable {name}={value!r} is not a whole number") from None


def _checked(rank: int, world: int, what: str) -> tuple[int, int]:
    if not 0 <= rank < world:
        raise StageConfigError(f"{what}: rank {rank} is not in [0, {world})")
    return rank, world


def _slurm(env: Mapping[str, str]) -> tuple[int, int] | None:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env and "SLURM_ARRAY_TASK_ID" not in env:
        return None
    procid, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", "1")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = _int(env, "SLURM_ARRAY_TASK_ID") - _int(env, "SLURM_ARRAY_TASK_MIN", "0")
        return _checked(
            index * ntasks + procid,
            _int(env, "SLURM_ARRAY_TASK_COUNT") * ntasks,
            "SLURM_ARRAY_TASK_ID/SLURM_PROCID",
        )
    return _checked(procid, ntasks, "SLURM_PROCID/SLURM_NTASKS")


def rank_and_world(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    slurm = None if "LOCAL_RANK" in env else _slurm(env)  # inside torchrun, its RANK counts processes
    if slurm is not None:
        return slurm
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(_int(env, "RANK"), _int(env, "WORLD_SIZE"), "RANK/WORLD_SIZE")
    return 0, 1


def context_from_env(
    root: Path, seed: int, force: bool = False, env: Mapping[str, str] = os.environ
) -> RunContext:
    rank, world = rank_and_world(env)
    return RunContext(root=Path(root), rank=rank, world_size=world, seed=seed, force=force)
