"""The schema a marker is checked against when it is read (shards/markers.py `read_marker`).

    UnitMarker     a stage unit's `_done/<unit>.json`: `unit`, `fingerprint`, `settings` (what every
                   marker written by `UnitPlan.mark_done` has) and, optionally, `outputs` in the
                   shape shards/verify.py checks; other keys (counts, stats) are kept as they are
    CacheMarker    a cache unit's marker (caption-bank texts, chunks, index): `rows`
    marker_problem(data, schema, unit) -> None, or one phrase saying what is wrong
    schema_problem(validation_error) -> the first problem as one phrase (also for other JSON records)

A marker that is valid JSON but not this shape (a list, an edited field, another unit's marker
copied over) is as damaged as a cut-off one: readers would otherwise fail deep inside with a
traceback, or trust files the marker does not describe.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Open(BaseModel):
    """Known fields typed strictly; any other key kept (markers carry stage-specific counts)."""

    model_config = ConfigDict(extra="allow", strict=True)


class OutputRecord(_Open):
    """One file's record under a marker's `outputs` (shards/verify.py `file_record`)."""

    bytes: int = Field(ge=0)
    mtime_ns: int | None = None
    sha256: str | None = None
    samples: int | None = Field(default=None, ge=0)
    rows: int | None = Field(default=None, ge=0)
    keys_sha256: str | None = None
    shape: list[int] | None = None


class UnitMarker(_Open):
    unit: str
    fingerprint: str
    settings: dict[str, Any]
    outputs: dict[str, OutputRecord] | None = None

    @field_validator("outputs")
    @classmethod
    def _inside_the_stage_folder(cls, outputs):
        """A unit's files are in its stage folder (paths relative to it): a marker naming a file
        elsewhere would make checks and repairs reach outside the run."""
        for name in outputs or {}:  # string tests, not PurePosixPath: 400,000 markers are read at once
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{name[:200]!r} is not a path inside the stage folder")
        return outputs


class CacheMarker(_Open):
    rows: int = Field(ge=0)
    dim: int | None = Field(default=None, gt=0)


def schema_problem(err: ValidationError) -> str:
    """The first problem of a validation error as a phrase: `field 'outputs.x.tar.bytes': input
    should be greater than or equal to 0` (`not a JSON object` when the whole value is wrong)."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if not where:
        return "not a JSON object" if first["type"] in ("model_type", "dict_type") else msg
    return f"field {where!r}: {msg[:1].lower()}{msg[1:]}"


def marker_problem(data: Any, schema: type[_Open], unit: str) -> str | None:
    """None when `data` (parsed JSON) is a marker of `schema` for `unit`; else what is wrong."""
    if not isinstance(data, dict):
        return f"marker is not a JSON object (a {type(data).__name__})"
    try:
        schema.model_validate(data)
    except ValidationError as err:
        return f"marker {schema_problem(err)}"
    if "unit" in schema.model_fields and data["unit"] != unit:
        return f"marker is for unit {str(data['unit'])[:64]!r}, not {unit!r}"
    return None
