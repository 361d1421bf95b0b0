"""What the finetune and realign stages share: checkpoint identities, AdamW parameter groups, the
global batch and its gradient accumulation, the engine, stale-checkpoint clean-up and the final
export with its marker."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from shards.atomic import remove_orphans, write_json_atomic
from shards.identity import file_sha256
from shards.naming import rank_split
from stages.base import RunContext, StageResult, UnitPlan, finish_stage, plan_units, sum_counts
from stages.errors import ShardError, StageConfigError
from stages.layout import FINAL_UNIT, CompleteStage, RunLayout
from stages.training.engine import make_engine, min_over_ranks
from stages.training.loop import checkpoint_problem, complete_checkpoints, read_meta, saved_global_batch
from stages.training.model import export_model

log = logging.getLogger(__name__)


def checkpoint_identity(pretrained: str | None) -> str | None:
    """A pretrained checkpoint file by content; a tag or hub name as written."""
    return file_sha256(Path(pretrained)) if pretrained and Path(pretrained).is_file() else pretrained


def adamw(
    named_parameters,
    lr_scales: dict[str, float],
    betas,
    eps: float,
    weight_decay: float,
    decay_matrices_only: bool,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; `lr_scales` maps a name prefix to a multiplier of the base lr
    (e.g. proxies at 100x). With `decay_matrices_only`, vectors and scalars get no weight decay."""
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        scale = next((s for prefix, s in lr_scales.items() if name.startswith(prefix)), 1.0)
        decay = 0.0 if decay_matrices_only and parameter.ndim < 2 else weight_decay
        groups.setdefault((scale, decay), []).append(parameter)
    param_groups = [
        {"params": params, "lr_scale": scale, "weight_decay": decay, "lr": 0.0}
        for (scale, decay), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, betas=tuple(betas), eps=eps)


def global_batch_plan(stage: str, cfg, ctx: RunContext, out: Path, fingerprint: str) -> tuple[int, int]:
    """(global batch, gradient accumulation) for this run, before any step: `global_batch` from the
    manifest, else the one the newest checkpoint was trained with (a run resumed on fewer or more
    processes stays the same experiment), else batch_size x processes. Raises one line when the
    global batch is not batch_size x processes x a whole number of micro steps."""
    micro, world = cfg.batch_size, ctx.world_size
    saved = None if cfg.global_batch else _newest_global_batch(out, fingerprint, micro)
    global_batch = cfg.global_batch or (saved[1] if saved else micro * world)
    if global_batch % (micro * world):
        source = f"kept from {saved[0]}" if saved else f"{stage}.global_batch"
        fits = [n for n in range(1, global_batch // micro + 1) if global_batch % (micro * n) == 0]
        counts = " or ".join(map(str, fits[-4:]))
        hint = f"run on {counts} process{'es' if fits[-1] > 1 else ''}" if fits else "change batch_size"
        raise StageConfigError(
            f"{stage}: the global batch of {global_batch} samples ({source}) is not batch_size {micro} x "
            f"{world} processes x a whole number of accumulation steps; {hint}, or set batch_size "
            f"so that batch_size x {world} divides {global_batch}"
        )
    return global_batch, global_batch // (micro * world)


def _newest_global_batch(out: Path, fingerprint: str, micro: int) -> tuple[Path, int] | None:
    """The newest complete checkpoint of these settings and its global batch; None when there is
    none (one of other settings is left to the loop's resume, or to --force, to deal with)."""
    try:
        folder, meta = next(complete_checkpoints(out, fingerprint, warn=False))
    except (StopIteration, StageConfigError):
        return None
    return folder, saved_global_batch(meta, micro)


def engine_for(cfg, ctx: RunContext, accumulation: int = 1):
    """The engine, which must agree with the run context on rank and world size: plain torch is one
    process (several would each train alone and overwrite each other's checkpoints), and DeepSpeed's
    process group is the one the context was built from (torchrun's RANK/WORLD_SIZE)."""
    if cfg.deepspeed is None and ctx.world_size > 1:
        raise StageConfigError(
            f"{ctx.world_size} processes without DeepSpeed would each train alone on the same "
            f"checkpoints (this is rank {ctx.rank}); set deepspeed: to train on "
            f"{ctx.world_size} processes, or run one process"
        )
    engine = make_engine(cfg.deepspeed, cfg.batch_size, cfg.grad_clip, cfg.device, accumulation)
    if (engine.rank, engine.world_size) != (ctx.rank, ctx.world_size):
        raise StageConfigError(
            f"the training engine is rank {engine.rank} of {engine.world_size}, but the "
            f"environment says rank {ctx.rank} of {ctx.world_size}; start training under "
            "torchrun (launch/slurm_mcip.sh does) so both come from RANK/WORLD_SIZE"
        )
    return engine


def verify_across_ranks(stage: CompleteStage, units: list[str], engine) -> None:
    """The full check (sha256) of `units` shared out: each rank checks its rank-split share, so a
    job of N ranks reads each file once, not N times. Every rank calls it; when any rank found a
    damaged unit every rank stops (the finding rank with the files named)."""
    problem = None
    try:
        stage.verify(rank_split(units, engine.rank, engine.world_size))
    except Exception as err:  # any: a rank that left before the all-reduce would hang the others
        problem = err
    first = min_over_ranks(engine.world_size if problem is None else engine.rank, engine.device)
    if problem is not None:
        raise problem
    if first < engine.world_size:
        raise ShardError(f"{stage.label}: rank {first} found damaged units (its log names them)")


def verified_units(root: Path, captions: str | None, engine) -> list[str]:
    """The downloaded units, once the image shards and (when `captions` is given) that caption set
    have passed the full check, shared out across the ranks (`verify_across_ranks`)."""
    layout = RunLayout(root)
    images = layout.downloaded()
    verify_across_ranks(images, images.units, engine)
    if captions is not None:
        verify_across_ranks(layout.captioned(captions), images.units, engine)
    return images.units


def drop_stale_checkpoints(out: Path, fingerprint: str, ctx: RunContext, engine) -> None:
    """With --force, rank 0 removes before resuming the checkpoints made with other settings and the
    ones that cannot be used: meta.json not valid, or a file it lists missing or of another size."""
    if ctx.force and engine.rank == 0:
        for folder in (out / "ckpt").glob("step-*"):
            try:
                meta = read_meta(folder)
            except ValueError as err:
                log.info("--force: removing %s (%s)", folder, err)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if meta is None:
                continue  # incomplete: the loop removes it when it resumes
            stale = meta["fingerprint"] != fingerprint
            problem = "made with other settings" if stale else checkpoint_problem(folder, meta)
            if problem:
                log.info("--force: removing %s (%s)", folder, problem)
                shutil.rmtree(folder, ignore_errors=True)
    engine.barrier()


def run_training_stage(
    name: str, folder: Path, settings: dict[str, Any], ctx: RunContext, train
) -> StageResult:
    """A training stage is one unit that every rank works on together: `train(plan)` when not done."""
    plan = plan_units(name, folder, [FINAL_UNIT], settings, ctx, split_by_rank=False)
    if plan.mine:
        if ctx.is_main:  # temporary files a killed run left beside the exported model
            remove_orphans(folder / FINAL_UNIT)
        train(plan)
    return finish_stage(name, plan, len(plan.mine), sum_counts)


def finish_training(
    engine, clip_model, architecture: dict[str, Any], plan: UnitPlan, out: Path, payload: dict[str, Any]
) -> None:
    """Rank 0 exports `final/model.pt` (the open_clip model alone) and `final/model.json` (its
    architecture and config folder, for the stages that load it), then writes the stage's marker."""
    if engine.rank == 0:
        export_model(clip_model, RunLayout.final_model(out))
        write_json_atomic(RunLayout.final_architecture(out), architecture)
        plan.mark_done(
            FINAL_UNIT, payload, outputs=[RunLayout.final_model(out), RunLayout.final_architecture(out)]
        )
    engine.barrier()
