"""A line per stage run per rank in `<root>/logs/runs.jsonl`: when, how long, which job and log.

`status` reads it for the samples per second of a stage's last run and for the log of the task that
owned each unit still pending (the stages' own split, `shards.naming.rank_split`). Appending one short
line with
O_APPEND is atomic enough for several ranks writing at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shards.marker_schema import schema_problem
from shards.naming import rank_split
from stages.errors import ShardError
from stages.layout import RunLayout

SAMPLE_KEYS = ("rows", "images", "samples_seen", "models")  # download, caption, training, evaluate


class RunRecord(BaseModel):
    """One line of runs.jsonl as `status` uses it (other keys, such as the job, are kept)."""

    model_config = ConfigDict(extra="allow")
    stage: str
    rank: int = Field(ge=0)
    world: int = Field(ge=1)
    started: float
    seconds: float = Field(ge=0)
    samples: int = Field(ge=0)
    log: str | None = None


def runs_file(root: Path) -> Path:
    return RunLayout(root).runs_log


def job_info(root: Path, stage: str, env=os.environ) -> dict[str, Any]:
    """The SLURM job and the task's log file (as the launcher's srun names it), or nothing locally."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return {}
    if "LOCAL_RANK" in env:  # training: one log per node (torchrun runs every process of the node)
        log = RunLayout(root).logs(stage) / f"{job}-node{env.get('SLURM_NODEID', '0')}.log"
    else:
        log = RunLayout(root).logs(stage) / f"{job}-task{env.get('SLURM_PROCID', '0')}.log"
    return {"job_id": job, "restart": int(env.get("SLURM_RESTART_COUNT", "0")), "log": str(log)}


def samples_of(counts: dict[str, Any]) -> int:
    return next((int(counts[k]) for k in SAMPLE_KEYS if k in counts), 0)


def record_run(root: Path, stage: str, rank: int, world: int, started: float, seconds: float, result) -> None:
    """Samples of this run: the stage's per-unit average times the units this rank finished now."""
    per_unit = samples_of(result.counts) / result.units_done if result.units_done else 0
    entry = {
        "stage": stage,
        "rank": rank,
        "world": world,
        "started": started,
        "seconds": round(seconds, 3),
        "units_run": result.units_run,
        "complete": result.is_complete,
        "samples": round(per_unit * result.units_run),
        **job_info(root, stage),
    }
    path = runs_file(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def last_runs(root: Path, stage: str) -> list[dict[str, Any]]:
    """The records of the stage's most recent run (every rank that started within a minute of the last)."""
    path = runs_file(root)
    if not path.exists():
        return []
    entries = [e for e in _entries(path) if e.get("stage") == stage]
    if not entries:
        return []
    latest = max(e["started"] for e in entries)
    return [e for e in entries if e["started"] >= latest - 60]


def _entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    try:
        text = path.read_text(errors="replace")
    except OSError as err:  # a folder in its place, no permission
        raise ShardError(f"{path}: cannot be read ({err.strerror or err}); remove it") from None
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ShardError(
                f"{path}: line {number} is not valid JSON (cut off by a crash?); delete that line"
            ) from None
        try:
            RunRecord.model_validate(entry)
        except ValidationError as err:
            raise ShardError(
                f"{path}: line {number} is not a run record ({schema_problem(err)}); delete that line"
            ) from None
        entries.append(entry)
    return entries


def samples_per_second(runs: list[dict[str, Any]]) -> float | None:
    seconds = max((r["seconds"] for r in runs), default=0)
    samples = sum(r["samples"] for r in runs)
    return samples / seconds if seconds > 0 and samples else None


def unit_logs(units: list[str], pending: list[str], runs: list[dict[str, Any]]) -> dict[str, str | None]:
    """For each pending unit, the log of the task that owned it in the last run (None if unknown)."""
    by_rank = {r["rank"]: r.get("log") for r in runs}
    world = runs[0]["world"] if runs else 1
    owner = {u: rank for rank in range(world) for u in rank_split(units, rank, world)}
    return {u: by_rank.get(owner[u]) for u in pending}
