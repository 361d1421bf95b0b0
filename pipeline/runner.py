"""Runs stages in order and reports their state (`plan`, `status`).

The stages and what a stage module offers are in `pipeline.registry`; the unit bookkeeping itself
(markers, fingerprints, rank split) is in `stages.base`. A stage whose input is not ready
(`InputNotReady`) is "waiting"; any other error is reported as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import run_log
from pipeline.manifest import Manifest, resolved_yaml
from pipeline.registry import stage_module
from shards import markers
from shards.atomic import write_text_atomic
from stages.base import RunContext, StageResult, fingerprint_of
from stages.errors import InputNotReady, StageError
from stages.layout import RunLayout

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


def check_inputs(manifest: Manifest) -> None:
    for name in manifest.configured_stages():
        stage_module(name).check_inputs(manifest.stage_config(name))


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
        log.info("stage %s: start", name)
        started = time.time()
        result = stage_module(name).run(manifest.stage_config(name), ctx, **(options or {}).get(name, {}))
        run_log.record_run(ctx.root, name, ctx.rank, ctx.world_size, started, time.time() - started, result)
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


def _write_resolved_manifest(manifest: Manifest, root: Path) -> None:
    """The manifest as run, with the fingerprint of every stage whose inputs exist so far."""
    fingerprints = {}
    for name in manifest.configured_stages():
        try:
            _, _, settings = stage_module(name).describe(manifest.stage_config(name), root, manifest.run.seed)
        except StageError:  # not ready yet, or unusable: that stage reports it when it runs
            continue
        fingerprints[name] = fingerprint_of(settings)
    write_text_atomic(RunLayout(root).resolved_manifest, resolved_yaml(manifest, fingerprints))


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
    units: list[str] = field(default_factory=list, repr=False)  # all of them, in rank-split order

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "units"}


def stage_status(manifest: Manifest, name: str) -> StageStatus:
    """Units done/total (done = marker with the current fingerprint) and merged counts."""
    module = stage_module(name)
    try:
        folder, units, settings = module.describe(
            manifest.stage_config(name), manifest.run.root, manifest.run.seed
        )
    except InputNotReady as err:
        return StageStatus(stage=name, units_total=0, units_done=0, units_stale=0, waiting_for=str(err))
    fingerprint = fingerprint_of(settings)
    found = markers.read_markers(folder, units)
    done = {u: m for u, m in found.items() if m.get("fingerprint") == fingerprint}
    return StageStatus(
        stage=name,
        units_total=len(units),
        units_done=len(done),
        units_stale=len(found) - len(done),
        pending=[u for u in units if u not in done],
        units=list(units),
        counts=module.merge_counts(list(done.values())),
        is_complete=len(done) == len(units),
    )
