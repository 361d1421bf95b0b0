"""The training loop shared by fine-tuning and re-alignment.

Reads  micro batches from a `batches(epoch, start_step)` function (`accumulation` of them per step on
       each rank); the loss from `compute_loss(batch)`.
Writes `<out>/ckpt/step-XXXXXXXX/`: every rank writes the engine state into one shared temporary
       folder `<out>/ckpt/.partial-step-XXXXXXXX/`; once all have, rank 0 renames it to `step-XXXXXXXX/`
       and then writes `meta.json` (step, samples seen, global batch, world size, fingerprint, and every
       file of the folder with its size) last: a checkpoint counts only when its meta exists. The
       newest `keep_checkpoints` complete ones are kept.
       `<out>/metrics.jsonl`: one JSON line per step, exactly one per step across restarts (a resume
       from step S first cuts the file back to steps 1..S, dropping a line a crash cut off).
       When tensorboard is installed (the `tensorboard` extra), the same scalars plus grad norm and
       samples/s as TensorBoard events in `<out>/tensorboard/` (`tensorboard --logdir <out>`); a resume
       from step S opens them with `purge_step=S+1`, so TensorBoard drops the steps it saw after S.
       With `record_samples`, `<out>/samples.jsonl`: per step the dataset indexes of its global batch
       (gathered from every rank), cut back on resume like metrics.jsonl.

Every step: learning rates from the schedule (cosine per step), backward, clip (in the engine, after
unscaling), optimizer step. A checkpoint every `checkpoint_every` steps and when SIGUSR1 or SIGTERM
arrives (then the loop stops and the caller exits, e.g. for a SLURM requeue). A restart resumes from
the newest complete checkpoint and continues with the very next global batch of the epoch, also on
another number of processes: the global batch stays (micro batch x processes x accumulation), the
engine converts the checkpoint (DeepSpeed's universal checkpoint), and the data position and the
learning rate follow from the step, i.e. from the samples seen. Before that, rank
0 removes what a crash left: `.partial-*` folders and `step-*` folders without meta.json. A checkpoint
that cannot be used (meta.json not valid JSON, a file missing or of another size than meta.json says,
or the engine failing to load it on any rank: the ranks agree through an all-reduce) is skipped with
one warning naming it and the error, and the one before it is tried; when checkpoints exist but none
can be used, that is a `ShardError` naming them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from shards.atomic import fsync_dir, write_json_atomic
from stages.errors import ShardError, StageConfigError
from stages.training.engine import min_over_ranks
from stages.training.records import (
    SAMPLES_FILE,
    board_scalars,
    engine_grad_norm,
    keep_metrics_until,
    local_grad_norm,
    record_samples,
    tensorboard_writer,
)

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
    batch_size: int  # per rank and micro step
    checkpoint_every: int
    lr_at: Callable[[int], float]
    keep_checkpoints: int = 2  # the newest complete ones; older ones are deleted
    global_batch: int = 0  # samples per optimizer step over all ranks; 0: batch_size x world size
    accumulation: int = 1  # micro steps per optimizer step
    record_samples: bool = False  # samples.jsonl: the indexes of every step's global batch

    def samples_per_step(self, world_size: int) -> int:
        return self.global_batch or self.batch_size * world_size


@dataclass
class LoopResult:
    step: int
    stopped_by_signal: bool
    samples_seen: int


PARTIAL_PREFIX = ".partial-"  # `ckpt/.partial-step-XXXXXXXX/`: being written; renamed when complete
META_KEYS = ("step", "epoch", "world_size", "fingerprint")


def _ckpt_dir(out: Path, step: int) -> Path:
    return out / "ckpt" / f"step-{step:08d}"


def read_meta(folder: Path) -> dict | None:
    """A checkpoint's meta.json; None when there is none (the checkpoint is incomplete). Raises
    ValueError when it is there but is not a valid one (a crash or a full disk cut it off)."""
    try:
        data = (folder / "meta.json").read_bytes()
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"meta.json is not valid JSON ({err})") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"meta.json lacks {', '.join(missing)}")
    if not isinstance(meta["step"], int) or not isinstance(meta.get("files", {}), dict):
        raise ValueError("meta.json has a step that is not a number or a file list that is not a mapping")
    return meta


def checkpoint_problem(folder: Path, meta: dict) -> str | None:
    """What is wrong with the files meta.json lists (missing, or another size), None when nothing.
    Checkpoints written before meta.json listed its files pass; their engine load is the check."""
    for name, size in sorted(meta.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, meta.json says {size}"
    return None


def complete_checkpoints(out: Path, fingerprint: str, warn: bool = True) -> Iterator[tuple[Path, dict]]:
    """Checkpoints with a valid meta.json, newest first; one whose meta.json is not valid is skipped
    (with a warning when `warn`); reaching one made with other settings is an error."""
    for folder in sorted((out / "ckpt").glob("step-*"), reverse=True):
        try:
            meta = read_meta(folder)
        except ValueError as err:
            if warn:
                log.warning("checkpoint %s is incomplete, skipping it: %s", folder, err)
            continue
        if meta is None:
            continue
        if meta["fingerprint"] != fingerprint:
            raise StageConfigError(
                f"{folder} was made with other settings (fingerprint {meta['fingerprint']}, "
                f"now {fingerprint}); rerun with --force to start over"
            )
        yield folder, meta


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
    if is_main:
        keep_metrics_until(plan.out / "metrics.jsonl", step)
        keep_metrics_until(plan.out / SAMPLES_FILE, step)
    metrics = open(plan.out / "metrics.jsonl", "a") if is_main else None
    ledger = open(plan.out / SAMPLES_FILE, "a") if is_main and plan.record_samples else None
    board = tensorboard_writer(plan.out, purge_step=step + 1) if is_main else None
    stopped = False
    with _StopFlag() as stop:
        while step < plan.total_steps and not stopped:
            epoch, position = divmod(step, plan.steps_per_epoch)
            for group in _groups(batches(epoch, position), plan.accumulation):
                step = _train_step(engine, model, optimizer, plan, group, compute_loss, step, metrics, board)
                if plan.record_samples:
                    record_samples(engine, group, epoch, step, ledger)
                progress.update(1)
                if stop.raised is not None or step % plan.checkpoint_every == 0 or step == plan.total_steps:
                    save_checkpoint(engine, plan, step)
                if stop.raised is not None:
                    log.info("signal %d: checkpoint at step %d written, stopping", stop.raised, step)
                    stopped = True
                if stopped or step >= plan.total_steps or step % plan.steps_per_epoch == 0:
                    break
    progress.close()
    for handle in (metrics, ledger, board):
        if handle:
            handle.close()
    return LoopResult(step, stopped, step * plan.samples_per_step(engine.world_size))


def _groups(micro_batches: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` micro batches (a last, shorter one is dropped: never a part step)."""
    group: list = []
    for batch in micro_batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _train_step(
    engine, model, optimizer, plan: LoopPlan, group: list, compute_loss, step: int, metrics, board=None
) -> int:
    lr = plan.lr_at(step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
    started = time.monotonic()
    losses, parts = [], {}
    for i, batch in enumerate(group):
        loss, terms = compute_loss(batch)
        engine.backward(loss, is_last=i == len(group) - 1)
        losses.append(loss.item())
        for name, value in terms.items():
            parts[name] = parts.get(name, 0.0) + float(value) / len(group)
    grad_norm = local_grad_norm(model) if board is not None else None
    engine.step()
    if metrics is not None:
        row = {
            "step": step + 1,
            "loss": sum(losses) / len(losses),
            "lr": lr,
            "seconds": time.monotonic() - started,
            "samples_seen": (step + 1) * plan.samples_per_step(engine.world_size),
            **parts,
        }
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if board is not None:
            board_scalars(
                board, row, engine_grad_norm(model, grad_norm), plan.samples_per_step(engine.world_size)
            )
    return step + 1


def save_checkpoint(engine, plan: LoopPlan, step: int) -> None:
    """Engine state on every rank into `ckpt/.partial-step-XXXXXXXX/`; once all ranks have written,
    rank 0 renames it to `step-XXXXXXXX/`, writes meta.json (last) and prunes older checkpoints."""
    folder = _ckpt_dir(plan.out, step)
    partial = folder.with_name(PARTIAL_PREFIX + folder.name)
    engine.save(partial)
    engine.barrier()
    if engine.rank == 0:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in partial.rglob("*") if p.is_file()}
        if folder.exists():  # one of an earlier attempt that could not be loaded
            shutil.rmtree(folder)
        os.rename(partial, folder)
        fsync_dir(folder.parent)
        epoch, position = divmod(step, plan.steps_per_epoch)
        per_step = plan.samples_per_step(engine.world_size)
        write_json_atomic(
            folder / "meta.json",
            {
                "step": step,
                "epoch": epoch,
                "position": position * per_step,  # in the epoch's order (stages/training/data.py)
                "samples_seen": step * per_step,
                "global_batch": per_step,
                "micro_batch": plan.batch_size,
                "accumulation": plan.accumulation,
                "world_size": engine.world_size,
                "fingerprint": plan.fingerprint,
                "files": dict(sorted(files.items())),
            },
        )
        _prune_checkpoints(plan.out, step, plan.keep_checkpoints)
    engine.barrier()


def _prune_checkpoints(out: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` with a valid meta.json; remove every folder
    older than those. Newer ones (left by an earlier attempt, not loadable) wait to be replaced."""
    older = [f for f in sorted((out / "ckpt").glob("step-*")) if f.name <= _ckpt_dir(out, step).name]
    valid = [f for f in older if _has_valid_meta(f)]
    for stale in older[: older.index(valid[-keep])] if len(valid) >= keep else []:
        shutil.rmtree(stale, ignore_errors=True)


def _has_valid_meta(folder: Path) -> bool:
    try:
        return read_meta(folder) is not None
    except ValueError:
        return False


def _resume(engine, plan: LoopPlan) -> int:
    """The step of the newest checkpoint every rank could load (0 when there is none)."""
    if engine.rank == 0:
        _remove_leftovers(plan.out / "ckpt")
    engine.barrier()
    failed, load_failed = [], False
    for folder, meta in complete_checkpoints(plan.out, plan.fingerprint, warn=engine.rank == 0):
        saved = saved_global_batch(meta, plan.batch_size)
        if saved != plan.samples_per_step(engine.world_size):
            raise StageConfigError(
                f"{folder} was trained with a global batch of {saved} samples, this run has "
                f"{plan.samples_per_step(engine.world_size)} ({plan.batch_size} x {engine.world_size} "
                f"processes x {plan.accumulation}); resume with global_batch: {saved} or rerun with --force"
            )
        problem = _agreed(engine, folder, checkpoint_problem(folder, meta))
        if problem is None:
            problem = _agreed(engine, folder, _load(engine, folder, meta["world_size"]))
            load_failed = load_failed or problem is not None
        if problem is None:
            n = meta["world_size"]
            moved = "" if n == engine.world_size else f", written by {n} process{'es' if n > 1 else ''}"
            log.info("resumed from %s (step %d, epoch %d%s)", folder, meta["step"], meta["epoch"], moved)
            return meta["step"]
        failed.append(folder)
    if failed:
        them = "them" if len(failed) > 1 else "it"
        fix = f"delete {them}" if load_failed else f"delete {them} or rerun with --force"
        raise ShardError(
            f"no checkpoint to resume from: {', '.join(map(str, failed))} cannot be loaded "
            f"(see the warnings above); {fix} to start over"
        )
    return 0


def _remove_leftovers(ckpt: Path) -> None:
    """What a crash leaves: `.partial-*` folders and `step-*` folders without meta.json."""
    leftovers = list(ckpt.glob(PARTIAL_PREFIX + "*"))
    leftovers += [f for f in ckpt.glob("step-*") if not (f / "meta.json").exists()]
    for folder in leftovers:
        log.info("removing %s, a checkpoint a crash left incomplete", folder)
        shutil.rmtree(folder, ignore_errors=True)


def saved_global_batch(meta: dict, micro_batch: int) -> int:
    """A checkpoint's global batch (older ones without it had no accumulation)."""
    return meta.get("global_batch") or meta["world_size"] * micro_batch


def _load(engine, folder: Path, saved_world_size: int) -> str | None:
    """Load the checkpoint into the engine; what went wrong as one line, or None."""
    try:
        engine.load(folder, saved_world_size)
    except Exception as err:  # cut-off or damaged files: EOFError, RuntimeError, UnpicklingError, ...
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


def _agreed(engine, folder: Path, problem: str | None) -> str | None:
    """None when no rank has a problem with `folder`; else the lowest such rank warns with its own
    and every rank returns a problem (all ranks call this for every checkpoint they try)."""
    first = min_over_ranks(engine.world_size if problem is None else engine.rank, engine.device)
    if first == engine.world_size:
        return None
    if engine.rank == first:
        where = "" if engine.world_size == 1 else f" on rank {engine.rank}"
        log.warning("checkpoint %s cannot be used%s, skipping it: %s", folder, where, problem)
    return problem or f"rank {first} could not load it"
