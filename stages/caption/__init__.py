"""Caption stage: several pseudo-captions per image into caption shards beside the image shards.

Reads  `images/<shard>.tar` of every downloaded shard (the download stage must be complete).
Writes `captions/<set>/<shard>.parquet` (schema in shards/captions.py: one row per image, in the image
       shard's key order), `captions/<set>/_done/<shard>.json` (last) and `captions/<set>/_SUCCESS.json`;
       the retrieval backend caches its bank under `caption_bank/`.
Run    `python -m stages.caption MANIFEST` (same as `python -m pipeline run MANIFEST --stage caption`).

Backends (captioning/): `vlm` (every transformers family in captioning/families.py: BLIP, BLIP-2,
LLaVA-1.5/NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM, PaliGemma, Florence-2), `blip` and
`llava` (the same captioner under the older names), `retrieval` (the paper's caption-bank retrieval),
`alt_text`, and `server` (an OpenAI-compatible inference server: captioning/server.py, started per task
by server_process.py with `server.serve`). Each takes its own section of the config (`generation`,
`retrieval`, `server`);
a section or key the chosen backend does not use is an error that names it. Images are decoded in
DataLoader workers (work.py, images.py); a corrupt image is counted and gets an empty caption list.
With `decoding: sample` captions are reproducible for the same seed, batch size and worker count;
beam search, prompts and retrieval do not depend on those.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from captioning.options import GenerationOptions, SearchOptions, ServerOptions
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
    sum_counts,
)
from stages.checks import Device, open_clip_config
from stages.errors import StageConfigError
from stages.layout import CAPTION_SET_NAME, RunLayout

log = logging.getLogger(__name__)

NAME = "caption"
FORMAT_VERSION = 1
# `server` shards from 2 on: a `failure` column (why an image has no captions) and sampled captions
# seeded per image, not per batch; other backends' shards gain a null `failure` column only, so
# their version (and their done units) stay as they were
SERVER_FORMAT_VERSION = 2


class FilterConfig(ConfigSection):
    min_words: int = Field(1, ge=0)
    dedupe: bool = True


class RetrievalSection(SearchOptions):
    """`caption.retrieval`: the bank, the open_clip model's weights, and how the bank is searched."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"bank_batch_size", "bank_wait_seconds", "search_memory_mib", "recall_sample", "query_batch"}
    )

    bank: ManifestPath  # txt (one caption per line), parquet or jsonl
    bank_col: str = "caption"
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint file
    config_dir: ManifestPath | None = None  # folder of extra open_clip JSON configs
    bank_batch_size: PositiveInt = 1024
    bank_wait_seconds: PositiveInt = 1800  # a rank waiting for another's bank chunk gives up after this
    query_batch: PositiveInt = 4096  # images per bank search (each search streams the whole bank once)

    _paths = field_validator("pretrained")(local_path_or_name)


class ScoringSection(ConfigSection):
    """`caption.scoring`: CLIP cosines for every caption (from `model`, or the retrieval backend's
    own), then captions below `min_score` dropped and the `keep_top` best kept."""

    model: str | None = None  # open_clip architecture
    pretrained: str | None = None
    config_dir: ManifestPath | None = None
    min_score: float | None = None
    keep_top: PositiveInt | None = None

    _paths = field_validator("pretrained")(local_path_or_name)


# The optional keys each backend uses; any other one set in the manifest is an error.
USES = {
    "blip": {"model", "captions_per_image", "generation", "dtype"},
    "llava": {"model", "captions_per_image", "generation", "dtype"},
    "vlm": {"model", "captions_per_image", "generation", "dtype"},
    "retrieval": {"model", "captions_per_image", "retrieval", "dtype"},
    "alt_text": set(),
    "server": {"model", "captions_per_image", "generation", "server"},
}
COMMON = {"backend", "captions", "seed", "filter", "scoring", "device", "batch_size", "num_workers"}


class CaptionConfig(StageConfig):
    """`stages.caption` in the manifest."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({"batch_size", "num_workers", "device"})

    backend: Literal["blip", "llava", "vlm", "retrieval", "alt_text", "server"]
    captions: str | None = Field(None, pattern=CAPTION_SET_NAME)  # the caption set; default: the backend
    model: str | None = None  # blip/llava/vlm: hub name or folder; retrieval: open_clip architecture
    captions_per_image: PositiveInt | None = None  # k; default: 5, or 20 for retrieval
    generation: GenerationOptions = GenerationOptions()
    retrieval: RetrievalSection | None = None
    server: ServerOptions | None = None  # server: an OpenAI-compatible server (captioning/server.py)
    scoring: ScoringSection = ScoringSection()
    filter: FilterConfig = FilterConfig()
    seed: int | None = None  # default: run.seed
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Device = "cpu"
    batch_size: PositiveInt = 32
    num_workers: int = Field(2, ge=0)

    _paths = field_validator("model")(local_path_or_name)

    @model_validator(mode="after")
    def _backend_uses(self) -> "CaptionConfig":
        unused = sorted(self.model_fields_set - USES[self.backend] - COMMON)
        if unused:
            uses = ", ".join(sorted(USES[self.backend])) or "none of its own"
            raise ValueError(f"{', '.join(unused)}: not used by backend {self.backend!r} (it uses: {uses})")
        if self.backend != "alt_text" and not self.model:
            raise ValueError(f"backend {self.backend!r} needs `model`")
        if self.backend == "retrieval" and self.retrieval is None:
            raise ValueError(
                "backend 'retrieval' needs a `retrieval` section with `bank` (txt, parquet or jsonl)"
            )
        if self.backend == "server" and self.server is None:
            raise ValueError("backend 'server' needs a `server` section with `endpoint` or `serve`")
        if self.backend == "server" and self.generation.decoding == "beam":
            raise ValueError("backend 'server': decoding 'beam' is not offered (use 'sample' or 'prompts')")
        if self.caption_set == ALT_TEXT:
            raise ValueError(f"captions: {ALT_TEXT!r} is reserved for the downloaded alt text")
        if self.scoring.min_score is not None and not self.has_scores:
            raise ValueError(
                "scoring.min_score needs CLIP scores: set scoring.model (or use the retrieval backend)"
            )
        if self.scoring.model is None and (self.scoring.pretrained or self.scoring.config_dir):
            raise ValueError("scoring.pretrained and scoring.config_dir need scoring.model")
        return self

    @property
    def k(self) -> int:
        return self.captions_per_image or (20 if self.backend == "retrieval" else 5)

    @property
    def caption_set(self) -> str:
        return self.captions or self.backend

    @property
    def has_scores(self) -> bool:
        return self.scoring.model is not None or self.backend == "retrieval"

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = super().fingerprint_settings()
        if self.retrieval is not None:
            settings["retrieval"] = self.retrieval.model_dump(
                mode="json", exclude=set(RetrievalSection.NOT_IN_FINGERPRINT)
            )
        if self.server is not None:
            settings["server"] = self.server.model_dump(mode="json", exclude=set(ServerOptions.SPEED_ONLY))
        return settings


def settings_of(cfg: CaptionConfig, input_fingerprint: str, seed: int) -> dict[str, Any]:
    from stages.caption.work import model_identity

    return {
        **cfg.fingerprint_settings(),
        "seed": cfg.seed if cfg.seed is not None else seed,
        "input_fingerprint": input_fingerprint,
        "model_identity": model_identity(cfg),
        "format_version": FORMAT_VERSION,
        **({"server_format_version": SERVER_FORMAT_VERSION} if cfg.backend == "server" else {}),
    }


def describe(cfg: CaptionConfig, root: Path, seed: int = 0) -> tuple[Path, list[str], dict[str, Any]]:
    layout = RunLayout(root)
    images = layout.downloaded()
    return layout.captions(cfg.caption_set), images.units, settings_of(cfg, images.fingerprint, seed)


def check_inputs(cfg: CaptionConfig) -> None:
    """What can be checked before the download stage has run: the bank and local model files."""
    if cfg.retrieval is not None and not cfg.retrieval.bank.is_file():
        raise StageConfigError(f"caption bank not found: {cfg.retrieval.bank}")
    pretrained = cfg.retrieval.pretrained if cfg.retrieval else None
    for value in (cfg.model, pretrained, cfg.scoring.pretrained):
        if value and value.startswith("/") and not Path(value).exists():
            raise StageConfigError(f"caption model not found: {value}")
    if cfg.backend == "retrieval":  # open_clip architectures and tags: checked without building them
        open_clip_config(cfg.model, pretrained, cfg.retrieval.config_dir, "caption")
    if cfg.scoring.model is not None:
        open_clip_config(cfg.scoring.model, cfg.scoring.pretrained, cfg.scoring.config_dir, "caption.scoring")


def _retry_plan(cfg: CaptionConfig, ctx: RunContext, plan) -> dict[str, dict[str, dict]]:
    if cfg.backend != "server":
        raise StageConfigError(
            f"--retry-failed: backend {cfg.backend!r} does not fail per image (only 'server' does)"
        )
    from stages.caption.streaming import failed_rows

    retry = failed_rows(plan, ctx)
    failed = sum(plan.done[u]["counts"]["failed_requests"] for u in retry)
    log.info("retry-failed: %d failed image(s) of %d done shard(s) sent again", failed, len(retry))
    return retry


def merge_counts(done_markers: list[dict[str, Any]]) -> dict[str, Any]:
    return sum_counts(done_markers)


def run(cfg: CaptionConfig, ctx: RunContext, retry_failed: bool = False) -> StageResult:
    """Caption this rank's pending image shards; with `retry_failed` (backend `server`), also send
    the images that failed in its done shards again and rewrite those shards."""
    from stages.caption import work

    layout = RunLayout(ctx.root)
    images = layout.downloaded(share=(ctx.rank, ctx.world_size))  # this rank's image shards only
    settings = settings_of(cfg, images.fingerprint, ctx.seed)
    plan = plan_units(NAME, layout.captions(cfg.caption_set), images.units, settings, ctx)
    retry = _retry_plan(cfg, ctx, plan) if retry_failed else {}
    images.verify(plan.mine + [u for u in retry if u not in plan.mine])  # the full check of the tars read
    if plan.mine or retry:
        from stages.caption.server_process import serving

        with serving(cfg, ctx, layout) as served:  # backend `server` with `serve`: the server, started
            work.caption_units(served, ctx, plan, layout, retry)
    result = finish_stage(NAME, plan, len(plan.mine) + len(retry), merge_counts)
    counts = result.counts
    log.info(
        "caption[%s]: %d/%d shards done (%d run now); %d images, %d captions, %d without captions, "
        "%d corrupt",
        cfg.caption_set,
        result.units_done,
        result.units_total,
        result.units_run,
        counts.get("images", 0),
        counts.get("captions", 0),
        counts.get("images_without_captions", 0),
        counts.get("corrupt_images", 0),
    )
    return result
