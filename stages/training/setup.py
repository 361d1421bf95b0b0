"""What the finetune and realign stages share: input fingerprints, AdamW parameter groups, the
engine, stale-checkpoint clean-up and the final export with its marker."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from shards.atomic import write_json_atomic
from shards.tars import file_sha256
from stages.base import RunContext, StageConfigError, StageResult, UnitPlan, finish_stage, plan_units, sum_counts
from stages.training.engine import make_engine
from stages.training.model import export_model

FINAL_UNIT = "final"


def stage_fingerprint(folder: Path, what: str) -> str:
    """The fingerprint in `<folder>/_SUCCESS.json`; the stage that made it must be complete."""
    success = Path(folder) / "_SUCCESS.json"
    if not success.exists():
        raise StageConfigError(f"{what} is not complete ({success} missing); run it first")
    return json.loads(success.read_text())["fingerprint"]


def checkpoint_identity(pretrained: str | None) -> str | None:
    """A pretrained checkpoint file by content; a tag or hub name as written."""
    return file_sha256(Path(pretrained)) if pretrained and Path(pretrained).is_file() else pretrained


def adamw(named_parameters, lr_scales: dict[str, float], betas, eps: float, weight_decay: float,
          decay_matrices_only: bool) -> torch.optim.AdamW:
    """AdamW over trainable parameters; `lr_scales` maps a name prefix to a multiplier of the base lr
    (e.g. proxies at 100x). With `decay_matrices_only`, vectors and scalars get no weight decay."""
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        scale = next((s for prefix, s in lr_scales.items() if name.startswith(prefix)), 1.0)
        decay = 0.0 if decay_matrices_only and parameter.ndim < 2 else weight_decay
        groups.setdefault((scale, decay), []).append(parameter)
    param_groups = [{"params": params, "lr_scale": scale, "weight_decay": decay, "lr": 0.0}
                    for (scale, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, betas=tuple(betas), eps=eps)


def engine_for(cfg, ctx: RunContext):
    """The engine; its rank and world size (from torchrun) are the ones training uses, whatever the
    run context says (under srun + torchrun, SLURM_PROCID counts nodes, not processes)."""
    return make_engine(cfg.deepspeed, cfg.batch_size, cfg.grad_clip, cfg.device)


def drop_stale_checkpoints(out: Path, fingerprint: str, ctx: RunContext, engine) -> None:
    """With --force, checkpoints made with other settings are removed (by rank 0) before resuming."""
    if ctx.force and engine.rank == 0:
        for meta in (out / "ckpt").glob("step-*/meta.json"):
            if json.loads(meta.read_text()).get("fingerprint") != fingerprint:
                shutil.rmtree(meta.parent, ignore_errors=True)
    engine.barrier()


def run_training_stage(name: str, folder: Path, settings: dict[str, Any], ctx: RunContext, train) -> StageResult:
    """A training stage is one unit that every rank works on together: `train(plan)` when not done."""
    plan = plan_units(name, folder, [FINAL_UNIT], settings, ctx, split_by_rank=False)
    if plan.mine:
        train(plan)
    return finish_stage(name, plan, len(plan.mine), sum_counts)


def finish_training(engine, clip_model, architecture: dict[str, Any], plan: UnitPlan, out: Path,
                    payload: dict[str, Any]) -> None:
    """Rank 0 exports `final/model.pt` (the open_clip model alone) and `final/model.json` (its
    architecture and config folder, for the stages that load it), then writes the stage's marker."""
    if engine.rank == 0:
        export_model(clip_model, out / FINAL_UNIT / "model.pt")
        write_json_atomic(out / FINAL_UNIT / "model.json", architecture)
        plan.mark_done(FINAL_UNIT, payload)
    engine.barrier()
