"""Atomic file writing: a temporary name in the same folder, fsync, rename.

A reader never sees a half-written file; a crash leaves at most a `.<name>.<random>.tmp` file, which
`remove_orphans` deletes on the next start.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    """A fresh temporary name beside `path`: unique per call, so processes that write the same file
    at once (e.g. every rank writing `_SUCCESS.json`) never rename each other's temporary away."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_tmp(tmp: Path, path: Path) -> None:
    """Rename an already written temporary file into place (fsync first)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_text_atomic(path: Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds exactly it (so a rerun rewrites
    nothing); return whether it wrote."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return True


def write_json_atomic(path: Path, payload: Any) -> bool:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def remove_orphans(folder: Path, prefix: str = "") -> list[Path]:
    """Delete temporary files left by a crash (`.<prefix>*.tmp`) in `folder`; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(f".{prefix}*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
