"""Content hashes (sha256) of input files, computed once per file version.

Fingerprints name inputs by content (a URL table, a caption bank, a checkpoint), and `plan`/`status`
compute them on every call, so multi-GB inputs are hashed once and then looked up by
(absolute path, size, mtime_ns): a file rewritten in place gets a new mtime and is hashed again.
The lookup lives in this process and, once `use_cache_dir(folder)` was called (the CLI calls it with
`$MCIP_CACHE_DIR`, default `~/.cache/mcip-pipeline`), in `<folder>/sha256/<hash of path>.json`: one
small file per input, written by rename, so concurrent ranks never corrupt it (the last one wins).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_memory: dict[tuple[str, int, int], str] = {}
_cache_dir: Path | None = None


def use_cache_dir(folder: Path | None) -> None:
    """Keep hashes on disk under `folder` too (None: in this process only)."""
    global _cache_dir
    _cache_dir = Path(folder) / "sha256" if folder is not None else None


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The file's sha256, read in full (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256, from the cache while its size and mtime are unchanged."""
    resolved = str(Path(path).resolve())
    stat = os.stat(resolved)
    key = (resolved, stat.st_size, stat.st_mtime_ns)
    if key in _memory:
        return _memory[key]
    digest = _read_disk_entry(key)
    if digest is None:
        digest = sha256_of(Path(resolved))
        _write_disk_entry(key, digest)
    _memory[key] = digest
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Note (in this process) the sha256 of a file just written, hashed while it was written."""
    resolved = str(Path(path).resolve())
    stat = os.stat(resolved)
    _memory[(resolved, stat.st_size, stat.st_mtime_ns)] = digest


def _entry_path(resolved: str) -> Path:
    return _cache_dir / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"


def _read_disk_entry(key: tuple[str, int, int]) -> str | None:
    if _cache_dir is None:
        return None
    try:
        entry = json.loads(_entry_path(key[0]).read_text())
    except (OSError, ValueError):  # missing or damaged: hash again
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):  # not ours: hash again
        return None
    if [entry.get("path"), entry.get("size"), entry.get("mtime_ns")] != list(key):
        return None
    return entry.get("sha256")


def _write_disk_entry(key: tuple[str, int, int], digest: str) -> None:
    if _cache_dir is None:
        return
    path = _entry_path(key[0])
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest}))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder only costs speed
        tmp.unlink(missing_ok=True)
