"""The stages, in run order: name -> config class, module and kind. Everything that lists stages
(the manifest's `stages:` and `slurm:` sections, the CLI's choices, `status`, the SLURM launcher's
plan) reads this table.

A stage module offers `run(cfg, ctx, **options) -> StageResult`, `describe(cfg, root, seed) ->
(folder, units, settings)`, `check_inputs(cfg)` (and optionally `deep_check_inputs(cfg)`, which
`validate` adds: checks that read whole inputs) and `merge_counts(markers)` (stages/base.py has the
unit bookkeeping they share). `kind` says how a job runs it: "data" stages split their units over
independent tasks; "training" stages are one unit that every process of a torchrun works on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from stages.caption import CaptionConfig
from stages.download import DownloadConfig
from stages.evaluate import EvaluateConfig
from stages.finetune import FinetuneConfig
from stages.index import IndexConfig
from stages.realign import RealignConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type
    module: str
    kind: Literal["data", "training"]

    def load(self):
        return importlib.import_module(self.module)


STAGES = (
    StageSpec("download", DownloadConfig, "stages.download", "data"),
    StageSpec("caption", CaptionConfig, "stages.caption", "data"),
    StageSpec("finetune", FinetuneConfig, "stages.finetune", "training"),
    StageSpec("realign", RealignConfig, "stages.realign", "training"),
    StageSpec("evaluate", EvaluateConfig, "stages.evaluate", "data"),
    StageSpec("index", IndexConfig, "stages.index", "data"),
)
STAGE_ORDER = tuple(spec.name for spec in STAGES)
DATA_STAGES = tuple(spec.name for spec in STAGES if spec.kind == "data")
TRAINING_STAGES = tuple(spec.name for spec in STAGES if spec.kind == "training")
_BY_NAME = {spec.name: spec for spec in STAGES}


def stage_spec(name: str) -> StageSpec:
    if name not in _BY_NAME:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGE_ORDER)})")
    return _BY_NAME[name]


def stage_module(name: str):
    return stage_spec(name).load()
