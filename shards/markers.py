"""Completion markers: `<stage dir>/_done/<unit>.json`, written last, by rename.

A unit is done when its marker exists, its fingerprint matches the current one and the files it
records are still what they were. The marker also keeps the settings that made the fingerprint, so a
mismatch can say what changed, and (since issue 15) what the unit produced:

    "outputs": {"000003.tar": {"bytes": 20480, "mtime_ns": ..., "samples": 5,
                               "keys_sha256": "...", "sha256": "..."}, ...}

paths relative to the stage folder; the record and its checks are in shards/verify.py. A marker
without "outputs" (written before) is trusted as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shards.atomic import write_json_atomic
from shards.marker_schema import UnitMarker, marker_problem

DONE_DIR = "_done"
SUCCESS_FILE = "_SUCCESS.json"
OUTPUTS = "outputs"  # the marker's record of the unit's files
MAX_MARKER_BYTES = 16 << 20  # a marker is a few KiB; anything near this is not one


class MarkerError(ValueError):
    """A marker file that exists but cannot be read (cut off by a crash, edited by hand) or is not a
    marker of its unit (shards/marker_schema.py); the message names the file."""


def marker_path(stage_dir: Path, unit: str) -> Path:
    return Path(stage_dir) / DONE_DIR / f"{unit}.json"


def write_marker(stage_dir: Path, unit: str, payload: dict[str, Any]) -> None:
    write_json_atomic(marker_path(stage_dir, unit), payload)


def read_marker(stage_dir: Path, unit: str, schema=UnitMarker) -> dict[str, Any] | None:
    """The marker of `unit` as written, None when there is none; `MarkerError` naming the file when
    it is not valid JSON or not a `schema` marker of this unit (a cache's markers: `CacheMarker`)."""
    path = os.path.join(stage_dir, DONE_DIR, f"{unit}.json")  # marker_path's, without pathlib's cost
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MARKER_BYTES + 1)
        if len(raw) > MAX_MARKER_BYTES:
            raise MarkerError(
                f"{path}: marker is larger than {MAX_MARKER_BYTES} bytes; delete it to redo the unit"
            )
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MarkerError(f"{path}: marker is not valid JSON ({err}); delete it to redo the unit") from None
    except OSError as err:  # a folder in its place, no permission
        raise MarkerError(f"{path}: marker cannot be read ({err.strerror or err}); remove it") from None
    problem = marker_problem(data, schema, unit)
    if problem:
        raise MarkerError(f"{path}: {problem}; delete it to redo the unit")
    return data


def read_markers(stage_dir: Path, units: list[str]) -> dict[str, dict[str, Any]]:
    """Markers that exist among `units`, by unit."""
    found = {}
    for unit in units:
        marker = read_marker(stage_dir, unit)
        if marker is not None:
            found[unit] = marker
    return found


def remove_marker(stage_dir: Path, unit: str) -> None:
    marker_path(stage_dir, unit).unlink(missing_ok=True)


def write_success(stage_dir: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(Path(stage_dir) / SUCCESS_FILE, payload)


def clear_success(stage_dir: Path) -> None:
    (Path(stage_dir) / SUCCESS_FILE).unlink(missing_ok=True)
