"""Every marker of a stage, read once: the whole-stage view (`status`, `plan`, `_SUCCESS.json`).

    summary = summary_file(root, stage_dir)                # <root>/logs/summaries/images.json
    found = read_all_markers(stage_dir, units, summary)    # {unit: its marker, slimmed (below)}
    changed = outputs_changed(stage_dir, marker)           # a cheap stat of its files (size, mtime)

The summary (under the run root's `logs/`, with the other run bookkeeping, not among the outputs)
keeps each marker as it was read, slimmed: without its settings (every unit shares them; only a
fingerprint mismatch needs them), its timings, and its outputs' content summaries (kept: each file's
size and mtime, the quick check's part), marked `"slim": true`; what needs the rest (a file that
changed, the full check) reads that one marker itself (`full_marker`). Entries are keyed by the marker
file's
(inode, size, mtime_ns, ctime_ns). An entry is used only while its marker file still has that key: a
marker written, replaced, edited or removed since is seen by its stat (ctime cannot be put back), and
the summary is written by rename, so a crash can leave it old or missing but never make it say more
than the markers do. It is written when a read found markers it did not hold (a stage updates it as it
finishes). One stat per marker instead of one read: a stage of 400,000 units is read in seconds. A
rank reads its own units' markers directly (shards/markers.py) and never this file, so its start-up
follows its share, not the stage.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from shards.atomic import write_text_atomic
from shards.markers import DONE_DIR, OUTPUTS, read_marker

log = logging.getLogger(__name__)

SUMMARY_VERSION = 2
_memory: dict[str, dict[str, Any]] = {}  # summary file -> its entries, for this process


def summary_file(root: Path, stage_dir: Path) -> Path:
    """`<root>/logs/summaries/<stage folder, relative to root, '/' as '__'>.json`."""
    try:
        name = Path(stage_dir).resolve().relative_to(Path(root).resolve()).as_posix().replace("/", "__")
    except ValueError:  # a folder outside the run root: named by its path
        name = Path(stage_dir).resolve().as_posix().strip("/").replace("/", "__")
    return Path(root) / "logs" / "summaries" / f"{'root' if name == '.' else name}.json"


def read_all_markers(stage_dir: Path, units: list[str], summary: Path) -> dict[str, dict[str, Any]]:
    """The markers that exist among `units`, without their "settings"; from `summary` where the
    marker file is unchanged, else read (a damaged one is a `MarkerError` naming its file)."""
    stage_dir = Path(stage_dir)
    entries = _load(summary)
    found, fresh, changed = {}, {}, False
    done = stage_dir / DONE_DIR
    try:
        folder_fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    try:
        for unit in units:
            try:
                stat = os.stat(f"{unit}.json", dir_fd=folder_fd)
            except FileNotFoundError:
                continue
            key = [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
            entry = entries.get(unit)
            if entry is None or entry[:4] != key:
                marker = read_marker(stage_dir, unit)
                if marker is None:  # removed between the stat and the read
                    continue
                entry, changed = [*key, slim(marker)], True
            fresh[unit] = entry
            found[unit] = entry[4]
    finally:
        os.close(folder_fd)
    if changed:  # entries of removed markers are dropped then too; alone they are harmless
        _store(summary, fresh)
    return found


def outputs_changed(stage_dir: Path, marker: dict[str, Any], folder_fd: int | None = None) -> bool:
    """True when a file the marker records has another size or mtime than recorded (or is gone):
    only then is the full record worth checking."""
    for relative, record in (marker.get(OUTPUTS) or {}).items():
        try:
            path = relative if folder_fd is not None else Path(stage_dir) / relative
            stat = os.stat(path, dir_fd=folder_fd)
        except OSError:
            return True
        if stat.st_size != record.get("bytes") or record.get("mtime_ns") not in (None, stat.st_mtime_ns):
            return True
    return False


def open_folder(stage_dir: Path) -> int | None:
    """A descriptor of the stage folder for `outputs_changed` (relative stats are cheaper)."""
    try:
        return os.open(stage_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None


SLIM = "slim"  # a marker as the summary keeps it
_DROPPED = frozenset({"settings", "finished_at", "seconds", "rank", "unit"})


def slim(marker: dict[str, Any]) -> dict[str, Any]:
    """The marker without settings and timings, each output only as its size and mtime."""
    kept = {k: v for k, v in marker.items() if k not in _DROPPED}
    if OUTPUTS in kept:
        kept[OUTPUTS] = {
            p: {"bytes": r.get("bytes"), "mtime_ns": r.get("mtime_ns")} for p, r in kept[OUTPUTS].items()
        }
    kept[SLIM] = True
    return kept


def full_marker(stage_dir: Path, unit: str, marker: dict[str, Any]) -> dict[str, Any]:
    """`marker` itself, or for a slim one the marker file as it is now (empty when it is gone)."""
    return (read_marker(stage_dir, unit) or {}) if marker.get(SLIM) else marker


def _load(summary: Path) -> dict[str, dict[str, Any]]:
    key = str(summary)
    if key in _memory:
        return _memory[key]
    try:
        data = json.loads(Path(summary).read_text())
        entries = data["units"] if data.get("version") == SUMMARY_VERSION else {}
        if not isinstance(entries, dict):
            entries = {}
    except FileNotFoundError:
        entries = {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # only a cache: read again
        log.debug("%s: unreadable summary (%s); reading the markers", summary, err)
        entries = {}
    entries = {u: e for u, e in entries.items() if _is_entry(e)}
    _memory[key] = entries
    return entries


def _is_entry(entry: Any) -> bool:
    """[inode, size, mtime_ns, ctime_ns, slim marker]"""
    return isinstance(entry, list) and len(entry) == 5 and isinstance(entry[4], dict)


def _store(summary: Path, entries: dict[str, dict[str, Any]]) -> None:
    _memory[str(summary)] = entries
    text = json.dumps({"version": SUMMARY_VERSION, "units": entries}, separators=(",", ":"))
    try:
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(summary, text)
    except OSError as err:  # a read-only run root only costs speed
        log.debug("%s: not written (%s)", summary, err)
