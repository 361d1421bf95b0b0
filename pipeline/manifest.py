"""The launch manifest: YAML loaded strictly into pydantic models.

Errors name the manifest file, the key path and the bad value, on one line:
`demo.yaml: stages.download.samples_per_shard: must be > 0, got -3`.
Relative paths are taken from the manifest's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from pipeline.registry import STAGE_ORDER, STAGES
from pipeline.slurm_config import SlurmSection
from stages.base import ManifestPath
from stages.errors import StageConfigError

MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a page of YAML


class ManifestError(StageConfigError):
    """A manifest that cannot be used; the message is one line naming file, key and value."""


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    root: ManifestPath
    seed: int = 0

    @field_validator("root")
    @classmethod
    def _a_folder(cls, root: Path) -> Path:
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file, not a folder")
        return root


# `stages:` has one optional key per registered stage, in run order
StagesSection = create_model(
    "StagesSection",
    __config__=ConfigDict(extra="forbid", frozen=True),
    **{spec.name: (spec.config | None, None) for spec in STAGES},
)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    run: RunSection
    stages: StagesSection = Field(default_factory=StagesSection)
    slurm: SlurmSection = Field(default_factory=SlurmSection)  # resources when run as SLURM jobs

    def configured_stages(self) -> list[str]:
        return [name for name in STAGE_ORDER if getattr(self.stages, name) is not None]

    def stage_config(self, name: str):
        cfg = getattr(self.stages, name, None)
        if cfg is None:
            raise ManifestError(
                f"stage {name!r} is not configured in the manifest "
                f"(configured: {', '.join(self.configured_stages()) or 'none'})"
            )
        return cfg


def load_manifest(path: Path) -> Manifest:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; is it a manifest?")
        data = yaml.safe_load(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:  # a folder, no permission
        raise ManifestError(f"{path}: cannot be read as a manifest ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ManifestError(
            f"{path}: a manifest is a mapping with 'run' and 'stages', got {type(data).__name__}"
        )
    try:
        return Manifest.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as err:
        raise ManifestError(f"{path}: " + "; ".join(_describe(e) for e in err.errors())) from None


_TEMPLATES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "literal_error": "must be one of {expected}",
}


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    template = _TEMPLATES.get(error["type"])
    what = template.format(**error.get("ctx", {})) if template else _plain(error["msg"])
    if error["type"] == "missing":
        return f"{where}: {what}"
    return f"{where}: {what}, got {error['input']!r}"


def _plain(msg: str) -> str:
    if msg.startswith("Value error, "):  # our own validators' text, kept as written
        return msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def resolved_yaml(manifest: Manifest, fingerprints: dict[str, str]) -> str:
    """The manifest as run (absolute paths), with a fingerprint per stage."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    data["fingerprints"] = fingerprints
    return yaml.safe_dump(data, sort_keys=False)
