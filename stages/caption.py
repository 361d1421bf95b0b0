"""Caption stage: several pseudo-captions per image into caption shards beside the image shards.

Reads  `images/<shard>.tar` of every downloaded shard (the download stage must be complete).
Writes `captions/<tag>/<shard>.parquet` (key, captions, scores, backend, model, prompts, seed; one row
       per image, in the image shard's key order), `captions/<tag>/_done/<shard>.json` (last) and
       `captions/<tag>/_SUCCESS.json`; the retrieval backend caches its bank under `caption_bank/`.
Run    `python -m stages.caption MANIFEST` (same as `python -m pipeline run MANIFEST --stage caption`).

Backends (captioning/): `blip` (BLIP, BLIP-2), `llava`, `retrieval` (the paper's caption-bank
retrieval) and `alt_text`. Images are decoded in DataLoader workers; a corrupt image is counted and
gets an empty caption list. With `decoding: sample` captions are reproducible for the same seed,
batch size and worker count; beam search, prompts and retrieval do not depend on those.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from shards.naming import list_shards
from stages.base import (ManifestPath, local_path_or_name, RunContext, StageConfig, StageConfigError, StageResult, finish_stage,
                         plan_units, sum_counts)

log = logging.getLogger(__name__)

NAME = "caption"
FORMAT_VERSION = 1


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_words: int = Field(1, ge=0)
    dedupe: bool = True


class ClipSpec(BaseModel):
    """An open_clip model: architecture, pretrained tag or checkpoint file, extra config folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    pretrained: str | None = None
    config_dir: ManifestPath | None = None

    _paths = field_validator("pretrained")(local_path_or_name)


class CaptionConfig(StageConfig):
    """`stages.caption` in the manifest."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "num_workers", "device", "bank_batch_size"})

    backend: Literal["blip", "llava", "retrieval", "alt_text"]
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str | None = None  # blip/llava: hub name or folder; retrieval: open_clip architecture
    pretrained: str | None = None  # retrieval: open_clip pretrained tag or checkpoint file
    config_dir: ManifestPath | None = None  # retrieval: folder of extra open_clip JSON configs
    captions_per_image: PositiveInt | None = None  # default: 5, or 20 for retrieval
    decoding: Literal["sample", "beam", "prompts"] = "sample"
    prompts: list[str] = []
    max_new_tokens: PositiveInt = 30
    min_new_tokens: int = Field(5, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    num_beams: PositiveInt | None = None
    seed: int | None = None  # default: run.seed
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    batch_size: PositiveInt = 32
    num_workers: int = Field(2, ge=0)
    filter: FilterConfig = FilterConfig()
    bank: ManifestPath | None = None
    bank_col: str = "caption"
    bank_batch_size: PositiveInt = 1024
    threshold: float = Field(0.271, ge=-1, le=1)
    index: Literal["flat", "ivf"] = "flat"
    ivf_nlist: PositiveInt = 1024
    ivf_nprobe: PositiveInt = 32
    score_with: ClipSpec | None = None
    min_score: float | None = None
    keep_top: PositiveInt | None = None

    _paths = field_validator("model", "pretrained")(local_path_or_name)

    @model_validator(mode="after")
    def _backend_needs(self) -> "CaptionConfig":
        if self.backend in ("blip", "llava", "retrieval") and not self.model:
            raise ValueError(f"backend {self.backend!r} needs `model`")
        if self.backend == "retrieval" and self.bank is None:
            raise ValueError("backend 'retrieval' needs `bank` (a caption file: txt, parquet or jsonl)")
        if self.decoding == "prompts" and not self.prompts:
            raise ValueError("decoding 'prompts' needs a non-empty `prompts` list")
        if self.min_score is not None and self.score_with is None and self.backend != "retrieval":
            raise ValueError("min_score needs CLIP scores: set `score_with` (or use the retrieval backend)")
        return self

    @property
    def k(self) -> int:
        return self.captions_per_image or (20 if self.backend == "retrieval" else 5)

    @property
    def output_tag(self) -> str:
        return self.tag or self.backend


def images_dir(root: Path) -> Path:
    return Path(root) / "images"


def stage_dir(root: Path, cfg: CaptionConfig) -> Path:
    return Path(root) / "captions" / cfg.output_tag


def _input_fingerprint(root: Path) -> tuple[list[str], str]:
    """The downloaded shards and the download stage's fingerprint; the stage must be complete."""
    import json

    success = images_dir(root) / "_SUCCESS.json"
    if not success.exists():
        done = len(list_shards(images_dir(root) / "_done", ".json"))
        raise StageConfigError(f"caption: the download stage is not complete in {images_dir(root)} "
                               f"({done} shards done, no _SUCCESS.json); run it first")
    return list_shards(images_dir(root) / "_done", ".json"), json.loads(success.read_text())["fingerprint"]


def settings_of(cfg: CaptionConfig, input_fingerprint: str, seed: int) -> dict[str, Any]:
    from stages._caption_run import model_identity

    return {**cfg.fingerprint_settings(), "seed": cfg.seed if cfg.seed is not None else seed,
            "input_fingerprint": input_fingerprint, "model_identity": model_identity(cfg),
            "format_version": FORMAT_VERSION}


def describe(cfg: CaptionConfig, root: Path, seed: int = 0) -> tuple[Path, list[str], dict[str, Any]]:
    units, input_fingerprint = _input_fingerprint(root)
    return stage_dir(root, cfg), units, settings_of(cfg, input_fingerprint, seed)


def check_inputs(cfg: CaptionConfig) -> None:
    """What can be checked before the download stage has run: the bank and local model files."""
    if cfg.bank is not None and not cfg.bank.is_file():
        raise StageConfigError(f"caption bank not found: {cfg.bank}")
    for value in (cfg.model, cfg.pretrained):
        if value and value.startswith("/") and not Path(value).exists():
            raise StageConfigError(f"caption model not found: {value}")


def merge_counts(done_markers: list[dict[str, Any]]) -> dict[str, Any]:
    return sum_counts(done_markers)


def run(cfg: CaptionConfig, ctx: RunContext) -> StageResult:
    """Caption this rank's pending image shards."""
    from stages import _caption_run

    units, input_fingerprint = _input_fingerprint(ctx.root)
    plan = plan_units(NAME, stage_dir(ctx.root, cfg), units, settings_of(cfg, input_fingerprint, ctx.seed), ctx)
    if plan.mine:
        _caption_run.caption_units(cfg, ctx, plan, images_dir(ctx.root))
    result = finish_stage(NAME, plan, len(plan.mine), merge_counts)
    counts = result.counts
    log.info("caption[%s]: %d/%d shards done (%d run now); %d images, %d captions, %d without captions, "
             "%d corrupt", cfg.output_tag, result.units_done, result.units_total, result.units_run,
             counts.get("images", 0), counts.get("captions", 0), counts.get("images_without_captions", 0),
             counts.get("corrupt_images", 0))
    return result


if __name__ == "__main__":  # `python -m stages.caption MANIFEST [--force]`
    import sys

    from pipeline.cli import main as pipeline_main

    sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", NAME, *sys.argv[2:]]))
