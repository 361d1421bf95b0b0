"""Evaluate stage: several models on image-to-image, k-NN, zero-shot and text-to-image benchmarks.

Reads  the models (a checkpoint file or pretrained tag, or a stage's output: `finetune/<name>`,
       `realign/<name>`) and the datasets named in the manifest (stages/evaluate/datasets.py).
Writes `evaluate/<name>/embeddings/<model>/<image set hash>.npy` (cache), `metrics/<model>.json` and
       `_done/<model>.json` per model (the unit of work), then `metrics.json`, `report.md` and the
       plots `metrics.png`, `retrieval_grid.png` once every model is done.
Run    `python -m stages.evaluate MANIFEST` (ranks split the models).

Protocols (shared/METHOD.md): i2i mAP with every image querying all images including itself;
k-NN (k 21, exp(cos/0.1) votes) with each class's images alternating between gallery and queries;
zero-shot with class names through the 80 OpenAI ImageNet templates; text-to-image Recall@k and mAP
with each distinct caption querying all images (relevant: the images carrying that caption).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from shards.atomic import remove_orphans
from shards.captions import ALT_TEXT
from stages.base import (
    ConfigSection,
    ManifestPath,
    RunContext,
    StageConfig,
    StageResult,
    finish_stage,
    local_path_or_name,
    plan_units,
)
from stages.checks import Device, open_clip_config
from stages.errors import StageConfigError
from stages.layout import CAPTION_SET_NAME, NAME_PATTERN, RunLayout

log = logging.getLogger(__name__)

NAME = "evaluate"
FORMAT_VERSION = 1


class ImageSource(ConfigSection):
    layout: Literal["gpr1200", "folder", "shards"]
    path: ManifestPath | None = None  # shards: a run root (default: this run's)


class KnnSection(ConfigSection):
    data: ImageSource
    k: PositiveInt = 21
    temperature: PositiveFloat = 0.1


class ZeroShotSection(ConfigSection):
    data: ImageSource
    class_names: ManifestPath  # json {label: name} or text `label<TAB>name` lines
    templates: list[str] | None = None  # with '{}' for the name; default: the 80 OpenAI templates

    @field_validator("templates")
    @classmethod
    def _placeholder(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("templates must be a non-empty list of strings containing '{}' once")
        for template in value or []:
            try:
                ok = template.count("{}") == 1 and bool(template.format("x"))
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"template {template!r} must contain '{{}}' once and no other braces")
        return value


class TextToImageSection(ConfigSection):
    layout: Literal["karpathy", "shards"]
    path: ManifestPath | None = None  # karpathy: the json; shards: a run root (default: this run's)
    image_root: ManifestPath | None = None  # karpathy: where filepath/filename live (default: json's folder)
    split: str = "test"
    captions: str = Field(
        ALT_TEXT, pattern=CAPTION_SET_NAME
    )  # shards: `alt` (the .txt alt text) or a caption set
    ks: list[PositiveInt] = [1, 5, 10]


class ModelEntry(ConfigSection):
    name: str = Field(pattern=r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*$")  # a file name: no leading dot
    checkpoint: str | None = None  # a checkpoint file, a pretrained tag, or None for random weights
    stage: str | None = Field(None, pattern=r"^(finetune|realign)/[A-Za-z0-9_.-]+$")

    _paths = field_validator("checkpoint")(local_path_or_name)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        if self.checkpoint and self.stage:
            raise ValueError(f"model {self.name!r}: give `checkpoint` or `stage`, not both")
        return self


class EvaluateConfig(StageConfig):
    """`stages.evaluate` in the manifest."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({"batch_size", "num_workers", "device"})

    name: str = Field("eval", pattern=NAME_PATTERN)
    model: str  # the open_clip architecture of every model
    config_dir: ManifestPath | None = None
    models: list[ModelEntry] = Field(min_length=1)
    retrieval: dict[str, ImageSource] = {}
    knn: KnnSection | None = None
    zero_shot: ZeroShotSection | None = None
    text_to_image: TextToImageSection | None = None
    grid: str | None = None  # the retrieval dataset shown in retrieval_grid.png (default: the first)
    batch_size: PositiveInt = 256
    num_workers: int = Field(2, ge=0)
    device: Device = "cpu"

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not (self.retrieval or self.knn or self.zero_shot or self.text_to_image):
            raise ValueError("nothing to evaluate: set retrieval, knn, zero_shot or text_to_image")
        if self.grid is not None and self.grid not in self.retrieval:
            raise ValueError(
                f"grid {self.grid!r} is not a retrieval dataset ({', '.join(self.retrieval) or 'none'})"
            )
        return self


def stage_dir(root: Path, cfg: EvaluateConfig) -> Path:
    return RunLayout(root).evaluate(cfg.name)


def model_checkpoint(root: Path, entry: ModelEntry) -> str | None:
    if entry.stage:
        return str(RunLayout.final_model(RunLayout(root).training_output(entry.stage)))
    return entry.checkpoint


def model_identity(root: Path, entry: ModelEntry) -> str | None:
    """A stage output by its stage fingerprint (it must be complete); a file by content."""
    from stages.training.setup import checkpoint_identity

    if entry.stage:
        layout = RunLayout(root)
        return layout.trained(layout.training_output(entry.stage), f"the {entry.stage} stage").fingerprint
    return checkpoint_identity(entry.checkpoint)


def settings_of(cfg: EvaluateConfig, root: Path, data) -> dict[str, Any]:
    """`data`: the config's datasets (scoring.Datasets), whose image sets are fingerprinted by content."""
    return {
        **cfg.fingerprint_settings(),
        "format_version": FORMAT_VERSION,
        "model_identities": {m.name: model_identity(root, m) for m in cfg.models},
        "datasets": {images.name: images.identity() for images in data.image_sets()},
        "text_files": _text_file_identities(cfg),
    }


def _text_file_identities(cfg: EvaluateConfig) -> dict[str, str]:
    """Class names and caption files by content: an edited file gives new metrics, not the old ones."""
    from shards.identity import file_sha256

    files = {}
    if cfg.zero_shot is not None:
        files["class_names"] = cfg.zero_shot.class_names
    if cfg.text_to_image is not None and cfg.text_to_image.layout == "karpathy" and cfg.text_to_image.path:
        files["karpathy"] = cfg.text_to_image.path
    return {name: file_sha256(path) for name, path in files.items() if Path(path).is_file()}


def describe(cfg: EvaluateConfig, root: Path, seed: int = 0):
    from stages.evaluate.scoring import Datasets

    return stage_dir(root, cfg), [m.name for m in cfg.models], settings_of(cfg, root, Datasets(cfg, root))


def check_inputs(cfg: EvaluateConfig) -> None:
    """The architecture with each model's pretrained tag or checkpoint file, and the class names."""
    for entry in cfg.models:
        open_clip_config(cfg.model, entry.checkpoint, cfg.config_dir, f"evaluate: model {entry.name!r}")
    if cfg.zero_shot is not None and not cfg.zero_shot.class_names.is_file():
        raise StageConfigError(f"evaluate: class names file not found: {cfg.zero_shot.class_names}")
    sources = {f"retrieval.{name}": source for name, source in cfg.retrieval.items()}
    sources.update({f"{s}.data": getattr(cfg, s).data for s in ("knn", "zero_shot") if getattr(cfg, s)})
    for where, source in sources.items():  # folders of pictures (a shards run root may come later)
        if source.layout != "shards" and source.path is not None and not source.path.is_dir():
            kind = "GPR1200 folder" if source.layout == "gpr1200" else "image folder"
            raise StageConfigError(f"evaluate.{where}: {kind} not found: {source.path}")


def merge_counts(done_markers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"models": len(done_markers)}


def run(cfg: EvaluateConfig, ctx: RunContext) -> StageResult:
    """Evaluate this rank's pending models; the main rank writes the report once all are done."""
    from stages.evaluate import report, scoring

    folder = stage_dir(ctx.root, cfg)
    data = scoring.Datasets(cfg, ctx.root)  # listed once: for the fingerprint, the models and the report
    plan = plan_units(NAME, folder, [m.name for m in cfg.models], settings_of(cfg, ctx.root, data), ctx)
    if plan.mine:
        for name in plan.mine:  # temporary files a killed run left for this rank's models
            remove_orphans(folder / "metrics", name)
            remove_orphans(folder / "embeddings" / name)
        for entry in (m for m in cfg.models if m.name in plan.mine):
            identity = plan.settings["model_identities"][entry.name]
            metrics = scoring.evaluate_model(cfg, ctx.root, entry, identity, data, folder)
            plan.mark_done(
                entry.name, {"metrics": metrics}, outputs=[folder / "metrics" / f"{entry.name}.json"]
            )
    result = finish_stage(NAME, plan, len(plan.mine), merge_counts)
    if result.is_complete and ctx.is_main and plan.holds_every_marker:
        table = report.write_report(cfg, data, folder, {u: plan.done[u]["metrics"] for u in plan.units})
        log.info("evaluate[%s]:\n%s\nreport: %s", cfg.name, table, folder / "report.md")
    return result
