"""Runs stages in order and reports their state (`plan`, `status`).

The stages and what a stage module offers are in `pipeline.registry`; the unit bookkeeping itself
(markers, fingerprints, rank split) is in `stages.base`. A stage whose input is not ready
(`InputNotReady`) or damaged (`DamagedOutput`: an upstream file no longer matches its marker) is
"waiting"; any other error is reported as it is. A unit whose own files no longer match its marker
is not done: `status` lists it under `damaged`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import run_log
from pipeline.manifest import Manifest, resolved_yaml
from pipeline.registry import stage_module
from shards import marker_view
from shards.atomic import write_text_atomic
from shards.locks import FileLock, LockHeld, LockUnusable
from stages.base import DamagedOutput, RunContext, StageResult, damaged_units, fingerprint_of, read_markers
from stages.errors import InputNotReady, StageError
from stages.layout import RunLayout, fingerprints_only
from stages.targets import writing

log = logging.getLogger(__name__)


def select_stages(manifest: Manifest, only: str | None = None, start: str | None = None) -> list[str]:
    configured = manifest.configured_stages()
    if only:
        manifest.stage_config(only)
        return [only]
    if start:
        manifest.stage_config(start)
        return configured[configured.index(start) :]
    return configured


def check_inputs(manifest: Manifest, deep: bool = False) -> None:
    """Each stage's quick input check (headers, paths); `deep` (what `validate` asks for) adds the
    checks that read whole inputs, for the stages that have them (`deep_check_inputs`)."""
    for name in manifest.configured_stages():
        module = stage_module(name)
        module.check_inputs(manifest.stage_config(name))
        if deep and hasattr(module, "deep_check_inputs"):
            module.deep_check_inputs(manifest.stage_config(name))


def run_stages(
    manifest: Manifest,
    ctx: RunContext,
    names: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    on_stage=None,
) -> list[StageResult]:
    """Run `names` in order; stop at the first stage that is not complete after its run."""
    check_inputs(manifest)  # before anything is written
    results = []
    for name in names:
        if on_stage:
            on_stage(name)
        _log_start(manifest, name, ctx)
        started = time.time()
        with _one_process_per_rank(ctx, name):
            result = stage_module(name).run(manifest.stage_config(name), ctx, **(options or {}).get(name, {}))
        with writing(run_log.runs_file(ctx.root), f"stage {name}"):
            run_log.record_run(
                ctx.root, name, ctx.rank, ctx.world_size, started, time.time() - started, result
            )
        _log_end(result, time.time() - started)
        results.append(result)
        if not result.is_complete:
            log.info(
                "stage %s: %d/%d units done; later stages wait for it",
                name,
                result.units_done,
                result.units_total,
            )
            break
    if ctx.is_main:  # once, after the stages: describing a stage re-reads its inputs
        _write_resolved_manifest(manifest, ctx.root)
    return results


@contextmanager
def _one_process_per_rank(ctx: RunContext, name: str):
    """Two processes with the same rank (a second run started by mistake, an orphan of a killed job)
    would write the same units: the second one stops at once and says who holds the rank."""
    try:
        with FileLock(RunLayout(ctx.root).lock(name, ctx.rank)):
            yield
    except LockUnusable as err:
        raise StageError(f"stage {name}: {err}") from None
    except LockHeld as held:
        pid, host = held.owner.get("pid", "?"), held.owner.get("host", "?")
        raise StageError(
            f"stage {name} rank {ctx.rank}/{ctx.world_size} is already running (pid {pid} on host {host}); "
            "set SLURM_PROCID/RANK to share the work"
        ) from None


FAILURE_KEYS = ("failed", "corrupt_images")  # download's failed rows, caption's undecodable images


def _log_start(manifest: Manifest, name: str, ctx: RunContext) -> None:
    """One line: the stage's units, pending and done (as `plan` counts them). A rank of many says
    only that it starts: counting every unit is the whole-stage view no rank should pay for."""
    if ctx.world_size > 1:
        log.info("stage %s: start (rank %d of %d)", name, ctx.rank, ctx.world_size)
        return
    try:  # the stage's plan checks the files next: the line counts the current markers only
        status = stage_status(manifest, name, check_files=False)
    except StageError as err:  # the stage itself reports it when it runs
        log.info("stage %s: start (%s)", name, err)
        return
    if status.waiting_for:
        log.info("stage %s: start", name)
        return
    pending = status.units_total - status.units_done
    log.info(
        "stage %s: start: %d units, %d pending, %d done", name, status.units_total, pending, status.units_done
    )


def _log_end(result: StageResult, seconds: float) -> None:
    """One line: units done (run now), samples, failures and the time the stage took."""
    failures = sum(int(result.counts.get(k, 0)) for k in FAILURE_KEYS)
    log.info(
        "stage %s: end: %d/%d units done (%d run now), %d samples, %d failures, %.1f s",
        result.stage,
        result.units_done,
        result.units_total,
        result.units_run,
        run_log.samples_of(result.counts),
        failures,
        seconds,
    )


def _write_resolved_manifest(manifest: Manifest, root: Path) -> None:
    """The manifest as run, with the fingerprint of every stage whose inputs exist so far."""
    fingerprints = {}
    for name in manifest.configured_stages():
        try:
            with fingerprints_only():  # rank 0 checks no other rank's units
                config = manifest.stage_config(name)
                _, _, settings = stage_module(name).describe(config, root, manifest.run.seed)
        except StageError:  # not ready yet, or unusable: that stage reports it when it runs
            continue
        fingerprints[name] = fingerprint_of(settings)
    path = RunLayout(root).resolved_manifest
    with writing(path, "run"):
        write_text_atomic(path, resolved_yaml(manifest, fingerprints))


@dataclass
class StageStatus:
    stage: str
    units_total: int
    units_done: int
    units_stale: int
    pending: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    is_complete: bool = False
    waiting_for: str | None = None  # why the stage cannot be planned yet (its input is missing)
    damaged: dict[str, str] = field(default_factory=dict)  # unit -> what differs from its marker
    units: list[str] = field(default_factory=list, repr=False)  # all of them, in rank-split order

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "units"}


def stage_status(manifest: Manifest, name: str, check_files: bool = True) -> StageStatus:
    """Units done/total (done = marker with the current fingerprint, its files as it records them:
    quick check, unless not `check_files`), the damaged units and merged counts."""
    module = stage_module(name)
    try:
        folder, units, settings = module.describe(
            manifest.stage_config(name), manifest.run.root, manifest.run.seed
        )
    except (InputNotReady, DamagedOutput) as err:
        return StageStatus(stage=name, units_total=0, units_done=0, units_stale=0, waiting_for=str(err))
    fingerprint = fingerprint_of(settings)
    found = read_markers(folder, units, manifest.run.root)
    current = marker_view.with_fingerprint(found, fingerprint)
    damaged = damaged_units(folder, current) if check_files else {}
    done = marker_view.without(current, damaged)
    return StageStatus(
        stage=name,
        units_total=len(units),
        units_done=len(done),
        units_stale=len(found) - len(current),
        pending=[u for u in units if u not in done],
        units=list(units),
        counts=marker_view.merged(done, module.merge_counts),
        is_complete=len(done) == len(units),
        damaged={u: ", ".join(problems) for u, problems in damaged.items()},
    )
