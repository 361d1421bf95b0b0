"""Every path of a run root, in one place, and the one check that an upstream stage is complete.

    <root>/images/<shard>.tar, .parquet, _done/, labels.json, _index.json      download
    <root>/captions/<set>/<shard>.parquet, _done/                               caption
    <root>/caption_bank/<fingerprint>/<chunk>.npy, _done/                       caption (retrieval)
    <root>/finetune/<name>/ckpt/, metrics.jsonl, final/model.pt, model.json     finetune
    <root>/embeddings/<name>/<shard>.npy, _done/                                realign (image side)
    <root>/realign/<name>/...                                                   realign
    <root>/evaluate/<name>/metrics.json, report.md, ...                         evaluate
    <root>/logs/<stage>/, logs/runs.jsonl, logs/locks/, slurm/jobs.json, manifest.resolved.yaml, inspect/

Stages ask a `RunLayout` for their paths instead of joining strings, so the layout can be read (and
changed) here. A stage is complete when its folder holds `_SUCCESS.json` (written once every unit has
its marker): `require_complete` is how a later stage asks, and it raises `InputNotReady` otherwise.
It also checks every unit's files against its marker (quick: sizes, and content where the mtime
changed) and raises `DamagedOutput` naming the file; a reader that opens the files anyway asks for
the full check of the units it reads with `CompleteStage.verify(units)`.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shards import marker_view
from shards.marker_view import SLIM
from shards.markers import DONE_DIR, OUTPUTS, SUCCESS_FILE
from shards.naming import list_shards, rank_split
from stages.base import DamagedOutput, damaged_units, read_markers
from stages.errors import InputNotReady, ShardError, StageConfigError

_CHECKING: ContextVar[bool] = ContextVar("check_complete_stages", default=True)


@contextmanager
def fingerprints_only():
    """Inside it, `require_complete` reads `_SUCCESS.json` and the unit names but checks no unit:
    for what needs only fingerprints (the resolved manifest), not the files."""
    token = _CHECKING.set(False)
    try:
        yield
    finally:
        _CHECKING.reset(token)


FINAL_UNIT = "final"  # the one unit of a training stage, and the folder of its exported model
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # caption sets and run names: a plain folder name
CAPTION_SET_NAME = NAME_PATTERN


@dataclass(frozen=True)
class CompleteStage:
    """A finished upstream stage: its folder, fingerprint and units (shard names; none for training)."""

    folder: Path
    fingerprint: str
    units: list[str]
    label: str = ""  # how errors name it: "download", "caption"
    markers: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    legacy_files: Callable[[str], list[Path]] | None = field(default=None, repr=False, compare=False)

    def verify(self, units: list[str] | None = None) -> "CompleteStage":
        """The full check (counts, keys, sha256) of `units` (default: all), for a reader about to
        open their files; `DamagedOutput` naming the file and what differs. Returns self."""
        chosen = self.units if units is None else units
        unread = [u for u in chosen if u not in self.markers]  # outside the share checked at first
        if unread:
            self.markers.update({u: _outputs_only(m) for u, m in read_markers(self.folder, unread).items()})
        problems = _unit_problems(self, marker_view.in_order(self.markers, chosen), full=True)
        if problems:
            raise DamagedOutput(self.label, problems)
        return self


def _unit_problems(
    stage: CompleteStage, found: dict[str, dict[str, Any]], full: bool
) -> dict[str, list[str]]:
    """What differs, by unit: recorded files against their records; a marker written before records
    existed only needs its stage's files (`legacy_files`) to exist."""
    recorded = marker_view.recorded(found)
    problems = damaged_units(stage.folder, recorded, full)
    for unit in (u for u in found if u not in recorded and stage.legacy_files):
        missing = [f"{path} is missing" for path in stage.legacy_files(unit) if not path.exists()]
        if missing:
            problems[unit] = missing
    return dict(sorted(problems.items()))


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # download
    @property
    def images(self) -> Path:
        return self.root / "images"

    def image_tar(self, unit: str) -> Path:
        return self.images / f"{unit}.tar"

    @property
    def labels_file(self) -> Path:
        """Class names of the `.cls` indexes: `{"column": ..., "labels": [...]}`."""
        return self.images / "labels.json"

    # caption
    def captions(self, caption_set: str) -> Path:
        if not re.fullmatch(CAPTION_SET_NAME, caption_set):  # a set named on the command line, too
            raise StageConfigError(f"caption set {caption_set[:80]!r} is not a plain folder name")
        return self.root / "captions" / caption_set

    def caption_shard(self, caption_set: str, unit: str) -> Path:
        return self.captions(caption_set) / f"{unit}.parquet"

    def caption_bank(self, fingerprint: str) -> Path:
        return self.root / "caption_bank" / fingerprint

    # training
    def finetune(self, name: str) -> Path:
        return self.root / "finetune" / name

    def realign(self, name: str) -> Path:
        return self.root / "realign" / name

    def training_output(self, stage_and_name: str) -> Path:
        """`finetune/<name>` or `realign/<name>`, as evaluate's `stage:` names a model."""
        stage, _, name = stage_and_name.partition("/")
        return self.finetune(name) if stage == "finetune" else self.realign(name)

    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / name

    @staticmethod
    def final_model(stage_folder: Path) -> Path:
        return Path(stage_folder) / FINAL_UNIT / "model.pt"

    @staticmethod
    def final_architecture(stage_folder: Path) -> Path:
        """`{"model": arch, "config_dir": ...}` beside the exported model."""
        return Path(stage_folder) / FINAL_UNIT / "model.json"

    # evaluate
    def evaluate(self, name: str) -> Path:
        return self.root / "evaluate" / name

    def inspect(self, page: str) -> Path:
        """The `inspect` command's page folder: `captions-<set>` or `download`."""
        return self.root / "inspect" / page

    # run bookkeeping
    def lock(self, stage: str, rank: int) -> Path:
        """Held while `stage` runs on `rank` (shards/locks.py): one process per stage and rank."""
        return self.root / "logs" / "locks" / f"{stage}-rank{rank}.lock"

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    @property
    def runs_log(self) -> Path:
        return self.root / "logs" / "runs.jsonl"

    @property
    def slurm_jobs(self) -> Path:
        return self.root / "slurm" / "jobs.json"

    @property
    def resolved_manifest(self) -> Path:
        return self.root / "manifest.resolved.yaml"

    def require_complete(
        self,
        folder: Path,
        what: str,
        label: str | None = None,
        legacy_files: Callable[[str], list[Path]] | None = None,
        unit_names: list[str] | None = None,
        share: tuple[int, int] | None = None,
    ) -> CompleteStage:
        """The finished stage in `folder`; `InputNotReady` naming `what` when it is not finished,
        `DamagedOutput` (errors name it `label`, default `what`) when a unit's files differ from its
        marker (quick check) or, for markers without a record, a file of `legacy_files(unit)` is
        missing. `unit_names`: the units to check when they are not shards (a training stage's
        `final`); the returned stage then lists no shard units. `share` (rank, world size): check
        only that rank's units (a rank of a later stage reads no others), else all of them."""
        success = Path(folder) / SUCCESS_FILE
        shards = list_shards(Path(folder) / DONE_DIR, ".json")
        units = shards if unit_names is None else unit_names
        if not success.exists():
            raise InputNotReady(
                f"{what} is not complete in {folder} ({len(units)} units done, "
                f"no {SUCCESS_FILE}); run it first"
            )
        try:
            fingerprint = json.loads(success.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ShardError(f"{success}: damaged ({err}); delete it and rerun {what}") from None
        checked = [] if not _CHECKING.get() else units if share is None else rank_split(units, *share)
        whole = self.root if share is None and len(checked) > 1 else None
        found = read_markers(Path(folder), checked, whole)
        if not isinstance(found, marker_view.MarkerView):  # a view keeps its markers as columns
            found = {u: _outputs_only(m) for u, m in found.items()}
        shard_units = shards if unit_names is None else []
        stage = CompleteStage(Path(folder), fingerprint, shard_units, label or what, found, legacy_files)
        problems = _unit_problems(stage, found, full=False)
        if problems:
            raise DamagedOutput(stage.label, problems)
        return stage

    def downloaded(self, share: tuple[int, int] | None = None) -> CompleteStage:
        return self.require_complete(
            self.images, "the download stage", "download", lambda u: [self.image_tar(u)], share=share
        )

    def finetuned(self, name: str) -> CompleteStage:
        return self.trained(self.finetune(name), f"finetune {name!r}")

    def trained(self, folder: Path, what: str) -> CompleteStage:
        """A finished training stage whose exported model (`final/model.pt`, `model.json`) is what its
        marker recorded."""
        files = lambda _unit: [self.final_model(folder), self.final_architecture(folder)]  # noqa: E731
        return self.require_complete(folder, what, legacy_files=files, unit_names=[FINAL_UNIT])

    def captioned(self, caption_set: str) -> CompleteStage:
        return self.require_complete(
            self.captions(caption_set),
            f"caption set {caption_set!r}",
            "caption",
            lambda u: [self.caption_shard(caption_set, u)],
        )


def _outputs_only(marker: dict[str, Any]) -> dict[str, Any]:
    """What a finished stage keeps of a marker (its settings can be large and are not needed)."""
    kept = {OUTPUTS: marker[OUTPUTS]} if OUTPUTS in marker else {}
    return {**kept, SLIM: True} if marker.get(SLIM) else kept  # the full check reads the rest


def read_labels(layout: RunLayout) -> list | None:
    """The class names of the download's `.cls` indexes (`images/labels.json`), or None without labels."""
    path = layout.labels_file
    if not path.exists():
        return None
    try:
        labels = json.loads(path.read_text())["labels"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: damaged ({err}); rerun the download stage with --force") from None
    if not isinstance(labels, list) or not all(isinstance(name, (str, int, float)) for name in labels):
        raise ShardError(
            f"{path}: damaged ('labels' is not a list of class names); rerun the download stage with --force"
        )
    return labels
