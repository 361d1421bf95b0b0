"""What the training loop writes besides checkpoints, on rank 0: `metrics.jsonl` (one JSON line per
step), TensorBoard events (`tensorboard/`, when the `tensorboard` extra is installed) and, with
`record_samples`, `samples.jsonl` (per step the dataset indexes of its global batch, gathered from
every rank). A resume from step S cuts the line files back to steps 1..S first."""

from __future__ import annotations

import json
from pathlib import Path

from shards.atomic import write_text_atomic
from stages.training.engine import gather_ints

SAMPLES_FILE = "samples.jsonl"


def record_samples(engine, group: list, epoch: int, step: int, ledger) -> None:
    """Every rank's dataset indexes of this step, one row on rank 0 (all ranks call this)."""
    import torch

    indexes = gather_ints(torch.cat([batch["index"] for batch in group]), engine.device)
    if ledger is not None:
        ledger.write(json.dumps({"step": step, "epoch": epoch, "indexes": sorted(indexes.tolist())}) + "\n")
        ledger.flush()


def keep_metrics_until(path: Path, step: int) -> None:
    """Cut `metrics.jsonl` back to one row per step for steps 1..`step` (the checkpoint resumed from):
    rows of the steps a crashed run took after it are trained again, and a line the crash cut off is
    dropped. Rewritten by rename, and only when something changes."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    rows: dict[int, str] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows[row["step"]] = line  # the latest run's row of a step repeated by older resumes
    write_text_atomic(path, "".join(rows[s] + "\n" for s in sorted(rows)))


def tensorboard_writer(out: Path, purge_step: int | None = None):
    """A TensorBoard `SummaryWriter` into `<out>/tensorboard/`, or None when tensorboard is not installed.
    With `purge_step`, TensorBoard drops the events of earlier runs at that step and later ones."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


def board_scalars(board, row: dict, grad_norm: float | None, samples: int) -> None:
    """`train/<name>` per metrics.jsonl value (loss terms, lr), grad norm and samples/s at `row["step"]`."""
    step = row["step"]
    for name, value in row.items():
        if name not in ("step", "seconds"):
            board.add_scalar(f"train/{name}", value, step)
    if grad_norm is not None:
        board.add_scalar("train/grad_norm", grad_norm, step)
    if row["seconds"] > 0:
        board.add_scalar("train/samples_per_second", samples / row["seconds"], step)


def local_grad_norm(model) -> float | None:
    """The L2 norm of this rank's gradients before clipping (None when they live elsewhere, as in ZeRO)."""
    import torch

    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None


def engine_grad_norm(model, fallback: float | None) -> float | None:
    """DeepSpeed's global grad norm of the step just taken, else the norm measured before it."""
    measure = getattr(model, "get_global_grad_norm", None)
    value = measure() if callable(measure) else None
    return float(value) if value is not None else fallback
