"""Index stage: one embedding per image with each chosen model, then a search index per model.

Reads  the image shards (this run's `images/*.tar`, or any webdataset tars named by `images:`, a
       glob), the models (a checkpoint file or pretrained tag, or `finetune/<name>`, `realign/<name>`)
       and optionally a caption set (`captions/<set>/`) for each image's best caption.
Writes `index/<name>/meta/<shard>.parquet` (key, url, alt, caption, captions, shard, offset, size)
       and `index/<name>/<model>/vectors/<shard>.npy` (fp16, L2-normalised rows in the metadata's
       order) per shard, then `_done/<shard>.json` (the unit of work, split over the ranks); then
       per model the unit `index-<model>` (search/build.py: the exact blocked search up to
       `exact_max_rows`, else a faiss IVF-PQ or HNSW index shaped by `memory_mib`, recall@k against
       exact on a held-out sample) writing `<model>/index.json` (the card), the faiss file and, with
       `texts: true`, the caption set's text embeddings (`<model>/texts/`, a caption-bank folder).
Run    `python -m stages.index MANIFEST` (same as `python -m pipeline run MANIFEST --stage index`);
       then `python -m pipeline search|serve MANIFEST --index <model>` (stages/index/search.py, serve.py).
"""

from __future__ import annotations

import glob
import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from shards.captions import ALT_TEXT
from stages.base import (
    ManifestPath,
    RunContext,
    StageConfig,
    StageResult,
    finish_stage,
    plan_units,
    sum_counts,
)
from stages.checks import Device, open_clip_config
from stages.errors import StageConfigError
from stages.evaluate import ModelEntry, model_identity
from stages.layout import CAPTION_SET_NAME, NAME_PATTERN, RunLayout

log = logging.getLogger(__name__)

NAME = "index"
FORMAT_VERSION = 1
BUILD_PREFIX = "index-"  # the build unit of model m is `index-m`; shard units are the tars' names


class IndexConfig(StageConfig):
    """`stages.index` in the manifest."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "num_workers", "device", "search_memory_mib", "wait_seconds", "images"}
    )

    name: str = Field("index", pattern=NAME_PATTERN)  # index/<name>/
    images: ManifestPath | None = None  # a glob of webdataset tars; default: this run's images/
    model: str  # the open_clip architecture of every model
    config_dir: ManifestPath | None = None
    models: list[ModelEntry] = Field(min_length=1)  # each gets its own index of the same images
    captions: str | None = Field(None, pattern=CAPTION_SET_NAME)  # best caption per image (`alt`: alt text)
    texts: bool = False  # also embed the caption set's distinct captions (image -> text search)
    kind: Literal["auto", "exact", "ivfpq", "hnsw"] = "auto"
    exact_max_rows: PositiveInt = 200_000  # auto: the exact blocked search up to this many images
    memory_mib: PositiveFloat = 1024  # auto: the approximate index's RAM budget (shapes its parameters)
    target_recall: float = Field(0.95, gt=0, le=1)  # nprobe / efSearch: the smallest reaching it
    recall_k: PositiveInt = 10
    recall_sample: PositiveInt = 1000  # held-out queries (images the index was not trained on)
    seed: int | None = None  # default: run.seed
    batch_size: PositiveInt = 256
    num_workers: int = Field(2, ge=0)
    device: Device = "cpu"
    search_memory_mib: PositiveFloat = 512  # speed only: the exact search's own memory
    wait_seconds: PositiveInt = 3600  # a rank building an index waits this long for other ranks' shards

    @model_validator(mode="after")
    def _consistent(self) -> "IndexConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.images is not None and self.captions not in (None, ALT_TEXT):
            raise ValueError("captions: a caption set belongs to this run's images; with `images:` use 'alt'")
        if self.texts and self.captions is None:
            raise ValueError("texts: true needs `captions` (a caption set, or 'alt' for the alt text)")
        return self

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = super().fingerprint_settings()
        settings["images"] = None if self.images is None else "glob"  # the tars by content, not path
        return settings


def stage_dir(root: Path, cfg: IndexConfig) -> Path:
    return Path(root) / "index" / cfg.name


def build_unit(model: str) -> str:
    return f"{BUILD_PREFIX}{model}"


def shard_sources(
    cfg: IndexConfig, root: Path, share: tuple[int, int] | None = None
) -> tuple[dict[str, Path], str]:
    """(shard name -> tar, identity of the input): this run's finished download (its units of
    `share`, (rank, world size), checked; all without it), or the glob's tars by content (names are
    the tars' stems)."""
    layout = RunLayout(root)
    if cfg.images is None:
        done = layout.downloaded(share=share)
        return {u: layout.image_tar(u) for u in done.units}, done.fingerprint
    from shards.identity import file_sha256

    tars = sorted(Path(p) for p in glob.glob(str(cfg.images)) if p.endswith(".tar"))
    if not tars:
        raise StageConfigError(f"index: images: no .tar files match {cfg.images}")
    by_name: dict[str, Path] = {}
    for tar in tars:
        name = tar.name[: -len(".tar")]
        if name in by_name or name.startswith(BUILD_PREFIX) or not _plain(name):
            raise StageConfigError(
                f"index: images: {tar}: shard names must be unique plain names, got {name!r}"
            )
        by_name[name] = tar
    digest = hashlib.sha256("".join(f"{n}:{file_sha256(p)}\n" for n, p in by_name.items()).encode())
    return by_name, digest.hexdigest()[:16]


def _plain(name: str) -> bool:
    import re

    return re.match(NAME_PATTERN, name) is not None


def settings_of(cfg: IndexConfig, root: Path, input_identity: str, seed: int) -> dict[str, Any]:
    layout = RunLayout(root)
    caption_set = None
    if cfg.captions not in (None, ALT_TEXT):
        caption_set = layout.captioned(cfg.captions).fingerprint
    return {
        **cfg.fingerprint_settings(),
        "seed": cfg.seed if cfg.seed is not None else seed,
        "format_version": FORMAT_VERSION,
        "input_fingerprint": input_identity,
        "caption_fingerprint": caption_set,
        "model_identities": {m.name: model_identity(root, m) for m in cfg.models},
    }


def describe(cfg: IndexConfig, root: Path, seed: int = 0):
    shards, identity = shard_sources(cfg, root)
    units = list(shards) + [build_unit(m.name) for m in cfg.models]
    return stage_dir(root, cfg), units, settings_of(cfg, root, identity, seed)


def check_inputs(cfg: IndexConfig) -> None:
    """Each model's architecture with its pretrained tag or checkpoint file; `images:` matches tars."""
    if cfg.images is not None and not any(p.endswith(".tar") for p in glob.glob(str(cfg.images))):
        raise StageConfigError(f"index: images: no .tar files match {cfg.images}")
    for entry in cfg.models:
        open_clip_config(cfg.model, entry.checkpoint, cfg.config_dir, f"index: model {entry.name!r}")


def merge_counts(done_markers: list[dict[str, Any]]) -> dict[str, Any]:
    return sum_counts(m for m in done_markers if "card" not in m)


def run(cfg: IndexConfig, ctx: RunContext) -> StageResult:
    """Embed this rank's pending shards; then build the indexes this rank owns once every shard is done."""
    from stages.index import build, embed

    shards, identity = shard_sources(cfg, ctx.root, share=(ctx.rank, ctx.world_size))  # shards come first
    folder = stage_dir(ctx.root, cfg)
    units = list(shards) + [build_unit(m.name) for m in cfg.models]
    plan = plan_units(NAME, folder, units, settings_of(cfg, ctx.root, identity, ctx.seed), ctx)
    mine = [u for u in plan.mine if u in shards]
    if mine:
        if cfg.images is None:
            RunLayout(ctx.root).downloaded().verify(mine)  # the full check of the tars about to be read
        embed.embed_shards(cfg, ctx, plan, {u: shards[u] for u in mine})
    for entry in cfg.models:
        if build_unit(entry.name) in plan.mine:
            build.wait_for_shards(plan, list(shards), cfg.wait_seconds, ctx)
            build.build_model_index(cfg, ctx, plan, entry, {u: shards[u] for u in shards})
    result = finish_stage(NAME, plan, len(plan.mine), merge_counts)
    log.info(
        "index[%s]: %d/%d units done (%d run now); %d images embedded, %d undecodable",
        cfg.name,
        result.units_done,
        result.units_total,
        result.units_run,
        result.counts.get("images", 0),
        result.counts.get("corrupt_images", 0),
    )
    return result
