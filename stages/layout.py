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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shards.markers import DONE_DIR, SUCCESS_FILE
from shards.naming import list_shards
from stages.errors import InputNotReady, ShardError

FINAL_UNIT = "final"  # the one unit of a training stage, and the folder of its exported model
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # caption sets and run names: a plain folder name
CAPTION_SET_NAME = NAME_PATTERN


@dataclass(frozen=True)
class CompleteStage:
    """A finished upstream stage: its folder, fingerprint and units (shard names; none for training)."""

    folder: Path
    fingerprint: str
    units: list[str]


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

    def require_complete(self, folder: Path, what: str) -> CompleteStage:
        """The finished stage in `folder`; `InputNotReady` naming `what` when it is not finished."""
        success = Path(folder) / SUCCESS_FILE
        units = list_shards(Path(folder) / DONE_DIR, ".json")
        if not success.exists():
            raise InputNotReady(
                f"{what} is not complete in {folder} ({len(units)} units done, "
                f"no {SUCCESS_FILE}); run it first"
            )
        try:
            fingerprint = json.loads(success.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ShardError(f"{success}: damaged ({err}); delete it and rerun {what}") from None
        return CompleteStage(Path(folder), fingerprint, units)

    def downloaded(self) -> CompleteStage:
        return self.require_complete(self.images, "the download stage")

    def finetuned(self, name: str) -> CompleteStage:
        return self.require_complete(self.finetune(name), f"finetune {name!r}")

    def captioned(self, caption_set: str) -> CompleteStage:
        return self.require_complete(self.captions(caption_set), f"caption set {caption_set!r}")


def read_labels(layout: RunLayout) -> list | None:
    """The class names of the download's `.cls` indexes (`images/labels.json`), or None without labels."""
    path = layout.labels_file
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: damaged ({err}); rerun the download stage with --force") from None
