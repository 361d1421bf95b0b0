"""What a unit's files were when its marker was written, and whether they still are.

    record = file_record(path)                   # written into the marker under "outputs"
    problem = check_file(path, record)           # None, or one phrase naming the file and what differs

A record holds the file's size (`bytes`) and `mtime_ns`, a content summary (webdataset `.tar`: the
sample count and the sha256 of its sorted keys; `.parquet`: the row count and, with a `key` column,
the sha256 of the sorted keys; `.npy`: the shape) and the file's `sha256` when it is under
`SHA256_MAX_BYTES` (hashed through shards/identity.py's cache).

The quick check (`full=False`, what `plan`, `status` and a stage's own planning do) compares the size,
and the content only when the mtime is not the recorded one (a copy or a rewrite changes it; a run
root copied with its mtimes kept costs nothing). The full check (what a reader that opens the file
anyway asks for) always compares the content: the sha256 where recorded (of the bytes, not a cached
hash), else the summary.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from shards.identity import file_sha256, sha256_of
from shards.tars import TruncatedTarError, tar_keys

SHA256_MAX_BYTES = 64 << 20


class UnreadableOutput(ValueError):
    """A file whose content summary cannot be read (cut off, overwritten, not its format)."""


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the sorted keys, one per line: equal for the same key set in any order."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def content_summary(path: Path) -> dict[str, Any]:
    """The cheap content summary of a file by its suffix (empty for other files)."""
    path = Path(path)
    if path.suffix == ".tar":
        try:
            keys = tar_keys(path)
        except TruncatedTarError as err:
            raise UnreadableOutput(f"is not a readable tar ({err.__cause__ or err})") from None
        return {"samples": len(keys), "keys_sha256": keys_digest(keys)}
    if path.suffix == ".parquet":
        return _parquet_summary(path)
    if path.suffix == ".npy":
        return _npy_summary(path)
    return {}


def _parquet_summary(path: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        summary: dict[str, Any] = {"rows": table.metadata.num_rows}
        if "key" in table.schema_arrow.names:
            keys = table.read(columns=["key"]).column("key").to_pylist()
            summary["keys_sha256"] = keys_digest(str(k) for k in keys)
    except (OSError, pa.ArrowException) as err:
        raise UnreadableOutput(f"is not a readable parquet table ({str(err).splitlines()[0]})") from None
    return summary


def _npy_summary(path: Path) -> dict[str, Any]:
    import numpy as np

    try:
        return {"shape": list(np.load(path, mmap_mode="r").shape)}
    except (OSError, ValueError, EOFError) as err:
        raise UnreadableOutput(f"is not a readable .npy array ({err})") from None


def file_record(path: Path) -> dict[str, Any]:
    """Size, mtime, content summary and (under SHA256_MAX_BYTES) sha256 of a file just written."""
    path = Path(path)
    stat = path.stat()
    try:
        record: dict[str, Any] = {
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            **content_summary(path),
        }
    except UnreadableOutput as err:
        raise UnreadableOutput(f"{path} {err}") from None
    if stat.st_size < SHA256_MAX_BYTES:
        record["sha256"] = file_sha256(path)
    return record


def outputs_record(stage_dir: Path, paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """`{path relative to the stage folder: file_record}` for a marker's "outputs"."""
    return {os.path.relpath(Path(p), Path(stage_dir)): file_record(Path(p)) for p in paths}


def check_file(path: Path, record: dict[str, Any], full: bool = False) -> str | None:
    """None when the file matches its record; else what differs, starting with the file's path."""
    path = Path(path)
    try:
        stat = path.stat()
        if not path.is_file():
            return f"{path} is not a file"
        if stat.st_size != record.get("bytes"):
            return f"{path} size {stat.st_size} != {record.get('bytes')} in its marker"
        if not full and record.get("mtime_ns") in (None, stat.st_mtime_ns):
            return None
        # the full check hashes the bytes themselves: a cached hash is keyed by size and mtime, which
        # an edit that puts the mtime back does not change
        if "sha256" in record and (sha256_of(path) if full else file_sha256(path)) == record["sha256"]:
            return None
        return _content_problem(path, record)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:  # permissions, I/O errors
        return f"{path} cannot be read ({err.strerror or err})"


def _content_problem(path: Path, record: dict[str, Any]) -> str | None:
    try:
        summary = content_summary(path)
    except UnreadableOutput as err:
        return f"{path} {err}"
    for name in ("samples", "rows", "shape"):
        if name in record and summary.get(name) != record[name]:
            return f"{path} holds {summary.get(name)} {name} != {record[name]} in its marker"
    if "keys_sha256" in record and summary.get("keys_sha256") != record["keys_sha256"]:
        return f"{path} holds other keys than its marker records"
    if "sha256" in record:  # the summary matched, the bytes did not (checked in check_file)
        return f"{path} content (sha256) differs from its marker"
    return None


def check_outputs(stage_dir: Path, outputs: dict[str, dict[str, Any]], full: bool = False) -> list[str]:
    """What differs in a marker's "outputs" (paths relative to `stage_dir`); empty when all match."""
    problems = []
    for relative, record in outputs.items():
        problem = check_file(Path(os.path.normpath(Path(stage_dir) / relative)), record, full)
        if problem:
            problems.append(problem)
    return problems
