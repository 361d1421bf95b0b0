"""The training loop shared by fine-tuning and re-alignment.

Reads  batches from a `batches(epoch, start_position)` function; the loss from `compute_loss(batch)`.
Writes `<out>/ckpt/step-XXXXXXXX/` (engine state, then `meta.json` last: a checkpoint counts only
       when its meta exists), `<out>/metrics.jsonl` (one JSON line per step, appended across restarts)
       and, when tensorboard is installed (the `tensorboard` extra), the same scalars plus grad norm
       and samples/s as TensorBoard events in `<out>/tensorboard/` (`tensorboard --logdir <out>`).

Every step: learning rates from the schedule (cosine per step), backward, clip (in the engine, after
unscaling), optimizer step. A checkpoint every `checkpoint_every` steps and when SIGUSR1 or SIGTERM
arrives (then the loop stops and the caller exits, e.g. for a SLURM requeue). A restart resumes from
the newest complete checkpoint and continues with the very next sample of the epoch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from shards.atomic import write_json_atomic
from stages.errors import StageConfigError

log = logging.getLogger(__name__)


def cosine_lr(base_lr: float, min_lr: float, total_steps: int) -> Callable[[int], float]:
    """Cosine decay per step from base_lr to min_lr, no warmup (METHOD.md)."""

    def lr_at(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))

    return lr_at


@dataclass
class LoopPlan:
    out: Path
    fingerprint: str
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # per rank
    checkpoint_every: int
    lr_at: Callable[[int], float]
    keep_checkpoints: int = 2  # the newest complete ones; older ones are deleted


@dataclass
class LoopResult:
    step: int
    stopped_by_signal: bool
    samples_seen: int


def _ckpt_dir(out: Path, step: int) -> Path:
    return out / "ckpt" / f"step-{step:08d}"


def newest_checkpoint(out: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The newest checkpoint whose meta.json exists; one made with other settings is an error."""
    for folder in sorted((out / "ckpt").glob("step-*"), reverse=True):
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != fingerprint:
            raise StageConfigError(
                f"{folder} was made with other settings (fingerprint {meta['fingerprint']}, "
                f"now {fingerprint}); rerun with --force to start over"
            )
        return folder, meta
    return None


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop checkpoints at the next step boundary and stops."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self._previous = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_loop(
    engine, model, optimizer, plan: LoopPlan, batches: Callable[[int, int], Iterable], compute_loss: Callable
) -> LoopResult:
    step = _resume(engine, plan)
    is_main = engine.rank == 0
    progress = tqdm(
        total=plan.total_steps, initial=step, desc=plan.out.name, unit="step", disable=not is_main
    )
    plan.out.mkdir(parents=True, exist_ok=True)
    metrics = open(plan.out / "metrics.jsonl", "a") if is_main else None
    board = tensorboard_writer(plan.out) if is_main else None
    stopped = False
    with _StopFlag() as stop:
        while step < plan.total_steps and not stopped:
            epoch, position = divmod(step, plan.steps_per_epoch)
            for batch in batches(epoch, position * plan.batch_size):
                step = _train_step(engine, model, optimizer, plan, batch, compute_loss, step, metrics, board)
                progress.update(1)
                if stop.raised is not None or step % plan.checkpoint_every == 0 or step == plan.total_steps:
                    save_checkpoint(engine, plan, step)
                if stop.raised is not None:
                    log.info("signal %d: checkpoint at step %d written, stopping", stop.raised, step)
                    stopped = True
                if stopped or step >= plan.total_steps or step % plan.steps_per_epoch == 0:
                    break
    progress.close()
    if metrics:
        metrics.close()
    if board:
        board.close()
    return LoopResult(step, stopped, step * plan.batch_size * engine.world_size)


def _train_step(
    engine, model, optimizer, plan: LoopPlan, batch, compute_loss, step: int, metrics, board=None
) -> int:
    lr = plan.lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    started = time.monotonic()
    loss, parts = compute_loss(batch)
    engine.backward(loss)
    grad_norm = _local_grad_norm(model) if board is not None else None
    engine.step()
    if metrics is not None:
        row = {
            "step": step + 1,
            "loss": loss.item(),
            "lr": lr,
            "seconds": time.monotonic() - started,
            **{k: float(v) for k, v in parts.items()},
        }
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if board is not None:
            _board_scalars(
                board, row, _engine_grad_norm(model, grad_norm), plan.batch_size * engine.world_size
            )
    return step + 1


def tensorboard_writer(out: Path):
    """A TensorBoard `SummaryWriter` into `<out>/tensorboard/`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _board_scalars(board, row: dict, grad_norm: float | None, samples: int) -> None:
    """`train/<name>` per metrics.jsonl value (loss terms, lr), grad norm and samples/s at `row["step"]`."""
    step = row["step"]
    for name, value in row.items():
        if name not in ("step", "seconds"):
            board.add_scalar(f"train/{name}", value, step)
    if grad_norm is not None:
        board.add_scalar("train/grad_norm", grad_norm, step)
    if row["seconds"] > 0:
        board.add_scalar("train/samples_per_second", samples / row["seconds"], step)


def _local_grad_norm(model) -> float | None:
    """The L2 norm of this rank's gradients before clipping (None when they live elsewhere, as in ZeRO)."""
    import torch

    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None


def _engine_grad_norm(model, fallback: float | None) -> float | None:
    """DeepSpeed's global grad norm of the step just taken, else the norm measured before it."""
    measure = getattr(model, "get_global_grad_norm", None)
    value = measure() if callable(measure) else None
    return float(value) if value is not None else fallback


def save_checkpoint(engine, plan: LoopPlan, step: int) -> None:
    """Engine state on every rank, then meta.json (last, by rank 0) once all ranks have written."""
    folder = _ckpt_dir(plan.out, step)
    engine.save(folder)
    engine.barrier()
    if engine.rank == 0:
        epoch, position = divmod(step, plan.steps_per_epoch)
        write_json_atomic(
            folder / "meta.json",
            {
                "step": step,
                "epoch": epoch,
                "position_per_rank": position * plan.batch_size,
                "samples_seen": step * plan.batch_size * engine.world_size,
                "world_size": engine.world_size,
                "fingerprint": plan.fingerprint,
            },
        )
        complete = sorted(p.parent for p in (plan.out / "ckpt").glob("step-*/meta.json"))
        for old in complete[: -plan.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()


def _resume(engine, plan: LoopPlan) -> int:
    found = newest_checkpoint(plan.out, plan.fingerprint)
    if found is None:
        return 0
    folder, meta = found
    if meta["world_size"] != engine.world_size:
        raise StageConfigError(
            f"{folder} was written by {meta['world_size']} processes, this run has "
            f"{engine.world_size}; resume with the same number"
        )
    engine.load(folder)
    engine.barrier()
    if engine.rank == 0:  # checkpoints a crash left without meta.json are of no use
        for stale in (plan.out / "ckpt").glob("step-*"):
            if not (stale / "meta.json").exists():
                shutil.rmtree(stale, ignore_errors=True)
    log.info("resumed from %s (step %d, epoch %d)", folder, meta["step"], meta["epoch"])
    return meta["step"]
