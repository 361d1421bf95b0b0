"""Realign stage: the fine-tuned model's text tower re-aligned to its new image embeddings.

Reads  `finetune/<source>/final/model.pt`, `images/`, and the texts: the downloaded alt text
       (`captions: alt`, the default), or the best caption of a caption set (`captions: <set>`).
Writes `embeddings/<name>/<shard>.npy` (image embeddings of the fine-tuned image tower, one unit per
       shard, resumable, + `_done/`), then `realign/<name>/ckpt/...`, `metrics.jsonl`,
       `final/model.pt` (fine-tuned image tower + realigned text tower) and `_done/final.json`.
Run    `python -m stages.realign MANIFEST` (or under torchrun with `deepspeed:`).

Trained: the last `unlocked_layers` text blocks, the final LayerNorm, the text projection and the
logit scale (clamped to [0, ln 100], or to [0, the loaded scale] when that is higher), with symmetric
InfoNCE against the frozen image embeddings; negatives are gathered across ranks (shared/METHOD.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from shards.captions import ALT_TEXT
from stages.base import ManifestPath, RunContext, StageConfig, StageResult, sum_counts
from stages.checks import Betas, Device, check_deepspeed_json, check_unlocked_layers, open_clip_config
from stages.layout import CAPTION_SET_NAME, FINAL_UNIT, NAME_PATTERN, RunLayout

log = logging.getLogger(__name__)

NAME = "realign"
FORMAT_VERSION = 1


class RealignConfig(StageConfig):
    """`stages.realign` in the manifest; defaults are the authors' (shared/METHOD.md)."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {
            "num_workers",
            "deepspeed",
            "device",
            "checkpoint_every",
            "embed_batch_size",
            "global_batch",
            "record_samples",
        }
    )

    name: str = Field("mcip", pattern=NAME_PATTERN)
    source: str | None = Field(
        None, pattern=NAME_PATTERN
    )  # the finetune run to realign; default: the same name
    model: str | None = None  # architecture; default: the one in finetune/<source>/final/model.json
    config_dir: ManifestPath | None = None
    captions: str = Field(ALT_TEXT, pattern=CAPTION_SET_NAME)  # texts: the alt text, or a caption set's best
    unlocked_layers: int = Field(1, ge=0)
    # infonce: symmetric InfoNCE (METHOD.md); siglip: SigLIP's sigmoid loss, which also trains the
    # model's logit_bias (SigLIP-style models only)
    loss: Literal["infonce", "siglip"] = "infonce"
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32768  # per process and micro step (the negatives: batch_size x processes)
    # samples per optimizer step over all processes: batch_size x processes x gradient accumulation;
    # default: what the newest checkpoint was trained with, else batch_size x processes
    global_batch: PositiveInt | None = None
    lr: PositiveFloat = 1.0e-5
    min_lr: float = Field(0.0, ge=0)
    betas: Betas = (0.9, 0.98)
    eps: PositiveFloat = 1.0e-6
    weight_decay: float = Field(0.2, ge=0)  # matrices only
    grad_clip: PositiveFloat | None = 1.0
    checkpoint_every: PositiveInt = 500
    embed_batch_size: PositiveInt = 256
    num_workers: int = Field(2, ge=0)
    record_samples: bool = False  # samples.jsonl: every step's sample indexes (an audit; costs a gather)
    deepspeed: ManifestPath | None = None
    device: Device = "cpu"

    @property
    def source_name(self) -> str:
        return self.source or self.name


def source_model(root: Path, cfg: RealignConfig) -> Path:
    return RunLayout.final_model(RunLayout(root).finetune(cfg.source_name))


def settings_of(cfg: RealignConfig, root: Path, seed: int) -> dict[str, Any]:
    from stages.training.setup import checkpoint_identity

    layout = RunLayout(root)
    inputs = {
        "finetune": layout.finetuned(cfg.source_name).fingerprint,
        "images": layout.downloaded().fingerprint,
    }
    if cfg.captions != ALT_TEXT:
        inputs["captions"] = layout.captioned(cfg.captions).fingerprint
    return {
        **cfg.fingerprint_settings(),
        **({"global_batch": cfg.global_batch} if cfg.global_batch else {}),  # unset: as before it existed
        "seed": seed,
        "inputs": inputs,
        "source_identity": checkpoint_identity(str(source_model(root, cfg))),
        "format_version": FORMAT_VERSION,
    }


def describe(cfg: RealignConfig, root: Path, seed: int = 0):
    return RunLayout(root).realign(cfg.name), [FINAL_UNIT], settings_of(cfg, root, seed)


def check_inputs(cfg: RealignConfig) -> None:
    """The DeepSpeed JSON; with `model` set, the architecture and `unlocked_layers` against its text
    depth (otherwise the architecture comes from the finetune run, checked when realign starts)."""
    check_deepspeed_json(cfg.deepspeed, NAME)
    if cfg.model is not None:
        check_unlocked_layers(
            cfg.unlocked_layers, open_clip_config(cfg.model, None, cfg.config_dir, NAME), NAME
        )


merge_counts = sum_counts


def run(cfg: RealignConfig, ctx: RunContext) -> StageResult:
    from stages.training import realigning
    from stages.training.setup import run_training_stage

    return run_training_stage(
        NAME,
        RunLayout(ctx.root).realign(cfg.name),
        settings_of(cfg, ctx.root, ctx.seed),
        ctx,
        lambda plan: realigning.train(cfg, ctx, plan),
    )


if __name__ == "__main__":  # `python -m stages.realign MANIFEST [--force]`
    import sys

    from pipeline.cli import main as pipeline_main

    sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", NAME, *sys.argv[2:]]))
