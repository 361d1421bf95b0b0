"""Checks that `validate` makes without building a model or reading data, so a run does not stop
hours in on a setting that could never work: devices, open_clip architectures and pretrained tags,
config folders, DeepSpeed JSON files and the depth of a text tower.

Reads only small files: open_clip's JSON configs (its own and a `config_dir`), a DeepSpeed config.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from stages.errors import StageConfigError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_device)]


def _betas(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in value):
        raise ValueError(f"betas must be in [0, 1), got {list(value)}")
    return value


Betas = Annotated[tuple[float, float], AfterValidator(_betas)]


def _is_checkpoint_file(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)


def open_clip_config(arch: str, pretrained: str | None, config_dir: Path | None, what: str) -> dict | None:
    """The architecture's JSON config (None for `hf-hub:` models, read at run time); errors name
    `what` (e.g. `finetune`) and the bad value: unknown architecture, missing folder or checkpoint,
    a pretrained tag open_clip does not have for this architecture."""
    import open_clip

    if config_dir is not None:
        if not Path(config_dir).is_dir():
            raise StageConfigError(f"{what}: open_clip config folder not found: {config_dir}")
        open_clip.add_model_config(str(config_dir))
    if arch.startswith(("hf-hub:", "local-dir:")):
        return None
    if arch not in open_clip.list_models():
        raise StageConfigError(
            f"{what}: unknown open_clip architecture {arch!r} "
            "(a custom one needs its JSON config in config_dir)"
        )
    if pretrained and _is_checkpoint_file(pretrained):
        if not Path(pretrained).is_file():
            raise StageConfigError(f"{what}: checkpoint not found: {pretrained}")
    elif pretrained and not open_clip.is_pretrained_cfg(arch, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise StageConfigError(
            f"{what}: open_clip has no pretrained tag {pretrained!r} for {arch} (tags: {tags})"
        )
    return open_clip.get_model_config(arch)


def text_depth(config: dict | None) -> int | None:
    """Blocks of the text tower an open_clip config describes (None when it names an HF model, whose
    depth is only known once its config is read at run time)."""
    text = (config or {}).get("text_cfg", {})
    if not config or "hf_model_name" in text:
        return None
    return int(text.get("layers", 12))


def check_unlocked_layers(unlocked: int, config: dict | None, what: str) -> None:
    depth = text_depth(config)
    if depth is not None and unlocked > depth:
        raise StageConfigError(
            f"{what}: unlocked_layers {unlocked} is more than the text tower's {depth} blocks"
        )


def check_deepspeed_json(path: Path | None, what: str) -> None:
    if path is None:
        return
    if not Path(path).is_file():
        raise StageConfigError(f"{what}: DeepSpeed config not found: {path}")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageConfigError(f"{what}: DeepSpeed config {path} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise StageConfigError(f"{what}: DeepSpeed config {path} is not a JSON object")
