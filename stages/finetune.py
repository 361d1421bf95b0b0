"""Finetune stage: the open_clip image tower trained with the MCIP losses (or ArcMargin alone).

Reads  `images/` (class labels `.cls` required) and, for `loss: mcip`, `captions/<captions>/`.
Writes `finetune/<name>/ckpt/step-XXXXXXXX/` (engine state + meta.json last), `metrics.jsonl`,
       `final/model.pt` ({"state_dict": ...}, loadable by open_clip) and `_done/final.json` last.
Run    `python -m stages.finetune MANIFEST`; several processes with DeepSpeed:
       `torchrun --nproc_per_node N -m stages.finetune MANIFEST` and `deepspeed:` in the manifest.

`loss: mcip`  = 0.75 ArcMargin(class proxies) + 0.25 Multi-Caption ArcMargin against the frozen
                text tower's embeddings of each image's captions (shared/METHOD.md);
`loss: gpr`   = ArcMargin only (2SFT stage 1). Trained: image tower (with projection) and proxies.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from stages.base import ManifestPath, RunContext, StageConfig, StageResult, local_path_or_name, sum_counts
from stages.checks import Betas, Device, check_deepspeed_json, open_clip_config
from stages.layout import CAPTION_SET_NAME, FINAL_UNIT, NAME_PATTERN, RunLayout

log = logging.getLogger(__name__)

NAME = "finetune"
FORMAT_VERSION = 1


class FinetuneConfig(StageConfig):
    """`stages.finetune` in the manifest; defaults are the authors' (shared/METHOD.md)."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"num_workers", "deepspeed", "device", "checkpoint_every", "global_batch", "record_samples"}
    )

    name: str = Field("mcip", pattern=NAME_PATTERN)
    model: str
    pretrained: str | None = None
    config_dir: ManifestPath | None = None
    loss: Literal["mcip", "gpr"] = "mcip"
    captions: str | None = Field(None, pattern=CAPTION_SET_NAME)  # the caption set, needed by loss mcip
    captions_per_image: PositiveInt = 20
    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 128  # per process and micro step
    # samples per optimizer step over all processes: batch_size x processes x gradient accumulation;
    # default: what the newest checkpoint was trained with, else batch_size x processes
    global_batch: PositiveInt | None = None
    lr: PositiveFloat = 1.0e-6
    min_lr: float = Field(1.0e-7, ge=0)
    proxy_lr_multiplier: PositiveFloat = 100.0
    betas: Betas = (0.9, 0.999)
    eps: PositiveFloat = 1.0e-8
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: PositiveFloat | None = 1.0
    scale: PositiveFloat = 30.0
    margin: float = Field(0.1, ge=0)
    arc_weight: float = Field(0.75, ge=0)
    caption_weight: float = Field(0.25, ge=0)
    max_term_weight: float = Field(0.1, ge=0)
    checkpoint_every: PositiveInt = 500
    num_workers: int = Field(2, ge=0)
    record_samples: bool = False  # samples.jsonl: every step's sample indexes (an audit; costs a gather)
    deepspeed: ManifestPath | None = None
    device: Device = "cpu"

    _paths = field_validator("pretrained")(local_path_or_name)

    @model_validator(mode="after")
    def _mcip_needs_captions(self) -> "FinetuneConfig":
        if self.loss == "mcip" and not self.captions:
            raise ValueError("loss 'mcip' needs `captions` (the caption set's tag)")
        return self


def settings_of(cfg: FinetuneConfig, root: Path, seed: int) -> dict[str, Any]:
    from stages.training.setup import checkpoint_identity

    layout = RunLayout(root)
    inputs = {"images": layout.downloaded().fingerprint}
    if cfg.loss == "mcip":
        inputs["captions"] = layout.captioned(cfg.captions).fingerprint
    return {
        **cfg.fingerprint_settings(),
        **({"global_batch": cfg.global_batch} if cfg.global_batch else {}),  # unset: as before it existed
        "seed": seed,
        "inputs": inputs,
        "pretrained_identity": checkpoint_identity(cfg.pretrained),
        "format_version": FORMAT_VERSION,
    }


def describe(cfg: FinetuneConfig, root: Path, seed: int = 0):
    return RunLayout(root).finetune(cfg.name), [FINAL_UNIT], settings_of(cfg, root, seed)


def check_inputs(cfg: FinetuneConfig) -> None:
    """Before anything runs: the DeepSpeed JSON, the architecture, its pretrained tag or file."""
    check_deepspeed_json(cfg.deepspeed, NAME)
    open_clip_config(cfg.model, cfg.pretrained, cfg.config_dir, NAME)


merge_counts = sum_counts


def run(cfg: FinetuneConfig, ctx: RunContext) -> StageResult:
    from stages.training import finetuning
    from stages.training.setup import run_training_stage

    return run_training_stage(
        NAME,
        RunLayout(ctx.root).finetune(cfg.name),
        settings_of(cfg, ctx.root, ctx.seed),
        ctx,
        lambda plan: finetuning.train(cfg, ctx, plan),
    )


if __name__ == "__main__":  # `python -m stages.finetune MANIFEST [--force]`
    import sys

    from pipeline.cli import main as pipeline_main

    sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", NAME, *sys.argv[2:]]))
