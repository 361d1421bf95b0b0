"""The schema a marker is checked against when it is read (shards/markers.py `read_marker`).

    UnitMarker     a stage unit's `_done/<unit>.json`: `unit`, `fingerprint`, `settings` (what every
                   marker written by `UnitPlan.mark_done` has) and, optionally, `outputs` in the
                   shape shards/verify.py checks; other keys (counts, stats) are kept as they are
    CacheMarker    a cache unit's marker (caption-bank texts, chunks, index): `rows`
    marker_problem(data, schema, unit) -> None, or one phrase saying what is wrong

A marker that is valid JSON but not this shape (a list, an edited field, another unit's marker
copied over) is as damaged as a cut-off one: readers would otherwise fail deep inside with a
traceback, or trust files the marker does not describe.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


class CacheMarker(_Open):
    rows: int = Field(ge=0)
    dim: int | None = Field(default=None, gt=0)


def marker_problem(data: Any, schema: type[_Open], unit: str) -> str | None:
    """None when `data` (parsed JSON) is a marker of `schema` for `unit`; else what is wrong."""
    if not isinstance(data, dict):
        return f"marker is not a JSON object (a {type(data).__name__})"
    try:
        schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "marker"
        return f"marker field {where!r}: {first['msg'].lower()}"
    if "unit" in schema.model_fields and data["unit"] != unit:
        return f"marker is for unit {str(data['unit'])[:64]!r}, not {unit!r}"
    return None
