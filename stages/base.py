"""What every stage shares: the run context, typed results, manifest paths, fingerprints and the
unit bookkeeping (which units are done, which are this rank's, mismatch checks, _SUCCESS.json).

A done unit's marker records its files (`mark_done(..., outputs=[...])`, shards/verify.py); a unit
whose files no longer match is damaged: not done, and a `DamagedOutput` error unless the run was
started with `--repair` (`ctx.repair`), which removes its marker so the unit is redone.

A rank reads and checks the markers and files of its own share of the units only. The whole-stage
check that writes `_SUCCESS.json` runs once: a rank whose share is done leaves `_done/_ranks/<world
size>-<rank>.json`, and the rank that finds every rank's file there reads all markers (through the
summary of shards/marker_summary.py) and writes `_SUCCESS.json` if every unit is done.

Stages import this; `pipeline` builds the `RunContext` from the environment and calls the stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, ValidationInfo, WrapValidator

from shards import marker_summary, marker_view, markers, verify
from shards.atomic import write_json_atomic
from shards.naming import rank_split
from stages.errors import ShardError, StageConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Who this process is and where the run lives; built once, passed explicitly."""

    root: Path
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    force: bool = False
    repair: bool = False  # redo units whose files no longer match their markers

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StageResult:
    stage: str
    units_total: int
    units_done: int
    units_run: int
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def is_complete(self) -> bool:
        return self.units_done == self.units_total


def _resolve_against_manifest(value: Any, handler, info: ValidationInfo) -> Path:
    path = Path(handler(value)).expanduser()
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else (Path(base) / path)


def local_path_or_name(value: str | None, info: ValidationInfo) -> str | None:
    """A model value that looks like a path (`/`, `./`, `../`, `~`) is taken from the manifest's
    folder; a hub name or pretrained tag stays as written. Use as a pydantic field validator."""
    if value is None or not value.startswith(("/", "./", "../", "~")):
        return value
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return str(path if path.is_absolute() or base is None else (Path(base) / path).resolve())


# A path in a manifest: relative paths are taken from the manifest's folder.
ManifestPath = Annotated[Path, WrapValidator(_resolve_against_manifest)]


class ConfigSection(BaseModel):
    """A nested section of a stage config: strict (unknown keys are errors) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageConfig(BaseModel):
    """Base of stage configs: unknown keys are errors.

    Fields in `NOT_IN_FINGERPRINT` (speed knobs such as processes or batch size, and input paths
    whose content is hashed instead) stay out of the fingerprint, so a resumed run may use other
    hardware or a moved input file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_settings(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_FINGERPRINT))


def fingerprint_of(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class UnitPlan:
    """The state of a stage's units for this rank."""

    stage_dir: Path
    fingerprint: str
    settings: dict[str, Any]
    units: list[str]
    done: MutableMapping[str, dict[str, Any]]  # the done units of this rank's share (or all)
    mine: list[str]  # this rank's pending units
    share: list[str] = field(default_factory=list)  # this rank's units, done or not
    rank: int = 0
    world_size: int = 1
    split_by_rank: bool = True
    root: Path | None = None  # the run root (where the stage's marker summary lives)

    @property
    def holds_every_marker(self) -> bool:
        """`done` holds every unit's marker: one process, or the rank that made the whole-stage
        check (a rank of many that found `_SUCCESS.json` holds only its share's)."""
        return len(self.done) == len(self.units)

    @property
    def pending(self) -> list[str]:
        """This rank's share's units that are not done (all units when the share is all of them)."""
        return [u for u in self.share if u not in self.done]

    def mark_done(self, unit: str, payload: dict[str, Any], outputs: Sequence[Path] = ()) -> None:
        """Write the unit's marker (last, by rename) with the fingerprint, its settings and a record
        of each file in `outputs` (size, content summary, sha256), which later runs check."""
        marker = {
            "unit": unit,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "finished_at": time.time(),
            **payload,
        }
        if outputs:
            try:
                marker[markers.OUTPUTS] = verify.outputs_record(self.stage_dir, outputs)
            except (OSError, verify.UnreadableOutput) as err:
                raise ShardError(f"unit {unit}: cannot record its output: {err}") from None
        markers.write_marker(self.stage_dir, unit, marker)
        self.done[unit] = marker


def repair_hint(manifest: str = "MANIFEST") -> str:
    """The command that redoes damaged units (the CLI puts in the manifest's path)."""
    return f"`mcip run {manifest} --repair`"


class DamagedOutput(ShardError):
    """Done units whose files no longer match their markers: one line naming each file (the first
    few) and what differs, and the command that redoes them."""

    SHOWN = 3

    def __init__(self, label: str, problems: dict[str, list[str]]) -> None:
        super().__init__(label, problems)
        self.label, self.problems = label, problems

    def __str__(self) -> str:
        units = list(self.problems)
        shown = "; ".join(
            f"{self.label} unit {u}: {', '.join(self.problems[u])}" for u in units[: self.SHOWN]
        )
        more = f"; {len(units) - self.SHOWN} more damaged units" if len(units) > self.SHOWN else ""
        return f"{shown}{more}; {repair_hint()} redoes {'it' if len(units) == 1 else 'them'}"


def damaged_units(
    stage_dir: Path, done: Mapping[str, dict[str, Any]], full: bool = False
) -> dict[str, list[str]]:
    """The done units (by marker) whose recorded files differ, with what differs; markers without a
    record of their files (written before records existed) are trusted. The quick check (`full`
    False) first stats each file; only a file whose size or mtime changed is looked into."""
    if full:
        suspects = list(done)
    else:
        suspects = marker_view.units_with_changed_outputs(stage_dir, done, marker_summary.outputs_changed)
    damaged = {}
    for unit in suspects:
        marker = marker_summary.full_marker(stage_dir, unit, done[unit])  # the whole record, to check
        problems = verify.check_outputs(stage_dir, marker.get(markers.OUTPUTS) or {}, full)
        if problems:
            damaged[unit] = problems
    return damaged


def read_markers(stage_dir: Path, units: list[str], root: Path | None = None) -> dict[str, dict[str, Any]]:
    """The markers that exist among `units`; a damaged one is a `ShardError` naming its file.
    With the run `root` (for a stage's whole view, many units): through the stage's marker summary
    under `<root>/logs/summaries/`, the markers without their settings."""
    try:
        if root is not None:
            return marker_summary.read_all_markers(
                stage_dir, units, marker_summary.summary_file(root, stage_dir)
            )
        return markers.read_markers(stage_dir, units)
    except markers.MarkerError as err:
        raise ShardError(str(err)) from None


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed) or "the stage's output format version"


def plan_units(
    stage: str,
    stage_dir: Path,
    units: list[str],
    settings: dict[str, Any],
    ctx: RunContext,
    split_by_rank: bool = True,
) -> UnitPlan:
    """Read markers, check fingerprints and files, and pick this rank's pending units.

    A done unit made with other settings is an error naming what changed; with `ctx.force` its
    marker is removed so the unit is redone. A done unit whose files differ from its marker's record
    (quick check: size, and content when the mtime changed) is a `DamagedOutput`; with `ctx.repair`
    its marker and `_SUCCESS.json` are removed so it is redone. Training stages (one collective
    unit that every rank works on) pass `split_by_rank=False`.
    """
    fingerprint = fingerprint_of(settings)
    share = rank_split(units, ctx.rank, ctx.world_size) if split_by_rank else list(units)
    done = read_markers(stage_dir, share, ctx.root if ctx.world_size == 1 and len(share) > 1 else None)
    current = marker_view.with_fingerprint(done, fingerprint)
    stale = [u for u in done if u not in current]
    if stale and not ctx.force:
        example = read_markers(stage_dir, stale[:1]).popitem()[1]  # with its settings
        raise StageConfigError(
            f"stage {stage}: {len(stale)} done unit(s) in {stage_dir} were made with other settings "
            f"({describe_change(example.get('settings', {}), settings)}); "
            "rerun with --force to redo them"
        )
    for unit in stale:
        markers.remove_marker(stage_dir, unit)
        del done[unit]
    _repair_damaged(stage, stage_dir, done, ctx)
    mine = [u for u in share if u not in done]
    plan = UnitPlan(
        Path(stage_dir), fingerprint, settings, list(units), done, mine, share, ctx.rank, ctx.world_size
    )
    plan.split_by_rank, plan.root = split_by_rank, ctx.root
    if mine and split_by_rank and ctx.world_size > 1:  # this share is not done: say so before any work
        _rank_file(plan).unlink(missing_ok=True)
    return plan


def _repair_damaged(stage: str, stage_dir: Path, done: dict[str, dict[str, Any]], ctx: RunContext) -> None:
    """Drop damaged units (of this rank's share: `done` holds no other) from `done`; without
    `ctx.repair` they are an error."""
    damaged = damaged_units(stage_dir, done)
    if not damaged:
        return
    if not ctx.repair:
        raise DamagedOutput(stage, damaged)
    for unit, problems in damaged.items():
        log.warning("%s unit %s: %s; redoing it (--repair)", stage, unit, ", ".join(problems))
        markers.remove_marker(stage_dir, unit)
        del done[unit]
    markers.clear_success(stage_dir)


RANKS_DIR = "_ranks"


def _rank_file(plan: UnitPlan) -> Path:
    return plan.stage_dir / markers.DONE_DIR / RANKS_DIR / f"{plan.world_size}-{plan.rank}.json"


def finish_stage(stage: str, plan: UnitPlan, units_run: int, merge_counts) -> StageResult:
    """When every unit is done (and its files match), write `_SUCCESS.json` with merged counts.

    One process that sees every unit knows from its plan (a training stage's ranks re-read its few
    markers, written by rank 0). A rank of many leaves its `_ranks` file once its share is done (and
    removes it when its share has work again); the rank that then finds all of them reads every
    marker once and writes `_SUCCESS.json`, unless it is there already and this rank did nothing."""
    if plan.world_size == 1:
        if units_run and len(plan.units) > 1:  # the summary learns the markers written now
            found = read_markers(plan.stage_dir, plan.units, plan.root)  # (its merge then cached)
            return _finish_whole(stage, plan, units_run, merge_counts, found)
        return _finish_whole(stage, plan, units_run, merge_counts, plan.done)
    if not plan.split_by_rank:
        return _finish_whole(stage, plan, units_run, merge_counts, read_markers(plan.stage_dir, plan.units))
    own = [plan.done[u] for u in plan.share if u in plan.done]
    if len(own) == len(plan.share):
        payload = {"fingerprint": plan.fingerprint, "units": len(own), "counts": merge_counts(own)}
        write_json_atomic(_rank_file(plan), payload)
    ranks = _rank_files(plan)
    if len(ranks) == plan.world_size:  # every share done since its rank last had work
        success = _read_success(plan.stage_dir)
        if success.get("fingerprint") == plan.fingerprint and not units_run:  # checked when written
            return StageResult(stage, len(plan.units), len(plan.units), units_run, success.get("counts", {}))
        found = read_markers(plan.stage_dir, plan.units, plan.root)
        return _finish_whole(stage, plan, units_run, merge_counts, found)
    done = sum(int(r.get("units", 0)) for r in ranks.values())
    return StageResult(stage, len(plan.units), done, units_run, merge_counts(own))


def _finish_whole(stage: str, plan: UnitPlan, units_run: int, merge_counts, found) -> StageResult:
    current = marker_view.with_fingerprint(found, plan.fingerprint)
    if plan.world_size > 1:  # other ranks' units (or a marker rank 0 wrote), not checked by this plan:
        damaged = damaged_units(plan.stage_dir, current)  # left for their rank to repair
        current = marker_view.without(current, damaged)
    plan.done = current
    counts = marker_view.merged(marker_view.in_order(current, plan.units), merge_counts)
    result = StageResult(stage, len(plan.units), len(current), units_run, counts)
    if result.is_complete:
        markers.write_success(
            plan.stage_dir,
            {"stage": stage, "fingerprint": plan.fingerprint, "units": len(plan.units), "counts": counts},
        )
    else:
        markers.clear_success(plan.stage_dir)
    return result


def _read_success(stage_dir: Path) -> dict[str, Any]:
    try:
        success = json.loads((Path(stage_dir) / markers.SUCCESS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return success if isinstance(success, dict) else {}


def _rank_files(plan: UnitPlan) -> dict[str, dict[str, Any]]:
    """This world size's rank files with the current fingerprint, by name."""
    folder = plan.stage_dir / markers.DONE_DIR / RANKS_DIR
    found = {}
    for path in folder.glob(f"{plan.world_size}-*.json") if folder.is_dir() else []:
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and payload.get("fingerprint") == plan.fingerprint:
            found[path.name] = payload
    return found


def sum_counts(marker_list: Iterable[dict[str, Any]], key: str = "counts") -> dict[str, Any]:
    """Add up the numeric `counts` of markers; nested dicts (e.g. failures by reason) too. One pass:
    the whole-stage view hands over its markers one at a time (shards/marker_view.py)."""
    total: dict[str, Any] = {}
    for marker in marker_list:
        add_counts(total, marker.get(key, {}))
    return total


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add the numbers of `part` into `total`, nested dicts too."""
    for name, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(name, {}), value)
        elif isinstance(value, (int, float)):
            total[name] = total.get(name, 0) + value
