"""The files and folders a manifest reads (URL table, caption bank, checkpoints, config folders,
evaluation images, class names, DeepSpeed configs, the manifest itself), for the commands that write
outside the stages (`export`, `inspect`): they must never write over them (stages/targets.py).

    manifest_inputs(manifest, manifest_path) -> [Path, ...]

Read from the validated stage configs: every `Path` value, and every absolute path string that
exists (model fields take a local path or a hub name). The run root itself is not an input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from pipeline.manifest import Manifest


def manifest_inputs(manifest: Manifest, manifest_path: Path) -> list[Path]:
    found = [Path(manifest_path)]
    for name in manifest.configured_stages():
        found.extend(_paths_in(manifest.stage_config(name)))
    return list(dict.fromkeys(found))


def _paths_in(value: Any) -> Iterator[Path]:
    if isinstance(value, Path):
        yield value
    elif isinstance(value, str):
        if value.startswith("/") and Path(value).exists():
            yield Path(value)
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _paths_in(getattr(value, field))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths_in(item)
