"""Every marker of a stage, read once: the whole-stage view (`status`, `plan`, `_SUCCESS.json`).

    summary = summary_file(root, stage_dir)                # <root>/logs/summaries/images.arrow
    found = read_all_markers(stage_dir, units, summary)    # a MarkerView: {unit: slim marker}
    changed = outputs_changed(stage_dir, marker)           # a cheap stat of its files (size, mtime)

The summary (under the run root's `logs/`, with the other run bookkeeping, not among the outputs)
is an Arrow file with one row per marker as it was read, slimmed: without its settings (every unit
shares them; only a fingerprint mismatch needs them) and timings; its fingerprint and its outputs'
sizes and mtimes (the quick check's part) as columns, the rest as a JSON string, decoded only when
a caller asks for that marker (shards/marker_view.py). What needs the full record (a file that
changed, the full check) reads that one marker itself (`full_marker`).

Rows are keyed by the marker file's (inode, size, mtime_ns, ctime_ns). A row is used only while
its marker file still has that key: a marker written, replaced, edited or removed since is seen by
its stat (ctime cannot be put back), and the summary is written by rename, so a crash can leave it
old or missing but never make it say more than the markers do. It is written when a read found
markers it did not hold (a stage updates it as it finishes). One stat per marker instead of one
read, and no JSON parse of 400,000 entries: `status` on 400,000 units takes about 7 s, most of it
the stats of the markers and their files (benchmarks/scale.py). A rank reads its own units'
markers directly (shards/markers.py) and never this file, so its start-up follows its share, not
the stage.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shards.atomic import atomic_write, remove_orphans
from shards.marker_view import KEY_COLUMNS, SLIM, MarkerView, SummaryTable
from shards.markers import DONE_DIR, OUTPUTS, read_marker

log = logging.getLogger(__name__)

SUMMARY_VERSION = b"3"
CHUNK = 8192  # markers read into one piece of the table
_OUTPUT = pa.struct([("path", pa.string()), ("bytes", pa.int64()), ("mtime_ns", pa.int64())])
SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        *[(name, pa.int64()) for name in KEY_COLUMNS],
        ("fingerprint", pa.string()),
        (OUTPUTS, pa.list_(_OUTPUT)),  # null: a marker without a record of its files
        ("rest", pa.string()),  # the slim marker's other fields, as JSON
    ],
    metadata={"version": SUMMARY_VERSION},
)
_memory: dict[str, SummaryTable] = {}  # summary file -> its table, for this process


def summary_file(root: Path, stage_dir: Path) -> Path:
    """`<root>/logs/summaries/<stage folder, relative to root, '/' as '__'>.arrow`."""
    try:
        name = Path(stage_dir).resolve().relative_to(Path(root).resolve()).as_posix().replace("/", "__")
    except ValueError:  # a folder outside the run root: named by its path
        name = Path(stage_dir).resolve().as_posix().strip("/").replace("/", "__")
    return Path(root) / "logs" / "summaries" / f"{'root' if name == '.' else name}.arrow"


def counts_file(summary: Path) -> Path:
    return Path(summary).with_suffix(".counts.json")


def read_all_markers(stage_dir: Path, units: list[str], summary: Path) -> MarkerView:
    """The markers that exist among `units`, without their "settings"; from `summary` where the
    marker file is unchanged, else read (a damaged one is a `MarkerError` naming its file)."""
    table = _load(summary)
    stats = _stat_markers(Path(stage_dir) / DONE_DIR, units)
    present = [i for i, key in enumerate(stats) if key is not None]
    asked = [units[i] for i in present]
    keys = np.array([stats[i] for i in present], dtype=np.int64).reshape(-1, len(KEY_COLUMNS))
    rows = np.fromiter((table.row_of.get(u, -1) for u in asked), dtype=np.int64, count=len(asked))
    same = (rows >= 0) & (table.keys[np.maximum(rows, 0)] == keys).all(axis=1) if len(table) else rows >= 0
    stale_rows = {int(r) for r in rows[~same] if r >= 0} | {
        table.row_of[u] for u in set(units) - set(asked) if u in table.row_of
    }
    unread = np.flatnonzero(~same).tolist()  # units whose marker is not in the summary as it is now
    table.stage_dir = Path(stage_dir)  # where a row that does not decode is read from instead
    if not unread and not stale_rows:
        return MarkerView(table, dict(zip(asked, rows.tolist())), counts_file(summary))
    fresh = [
        _fresh_table(stage_dir, asked, keys, unread[i : i + CHUNK]) for i in range(0, len(unread), CHUNK)
    ]
    table = _store(summary, table, stale_rows, fresh)
    table.stage_dir = Path(stage_dir)
    order = {u: i for i, u in enumerate(asked)}
    found = sorted((u for u in table.row_of if u in order), key=order.__getitem__)
    return MarkerView(table, {u: table.row_of[u] for u in found}, counts_file(summary))


def _stat_markers(done: Path, units: list[str]) -> list[list[int] | None]:
    """Each unit's marker file's key, None where it has none."""
    try:
        folder_fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return [None] * len(units)
    found: list[list[int] | None] = []
    try:
        for unit in units:
            try:
                stat = os.stat(f"{unit}.json", dir_fd=folder_fd)
            except FileNotFoundError:
                found.append(None)
                continue
            found.append([_signed(stat.st_ino), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    finally:
        os.close(folder_fd)
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


_DROPPED = frozenset({"settings", "finished_at", "seconds", "rank", "unit"})


def slim(marker: dict[str, Any]) -> dict[str, Any]:
    """The marker without settings and timings, each output only as its size and mtime."""
    kept = {k: v for k, v in marker.items() if k not in _DROPPED}
    if OUTPUTS in kept and kept[OUTPUTS] is None:  # no record of its files, as when the key is absent
        del kept[OUTPUTS]
    if OUTPUTS in kept:
        kept[OUTPUTS] = {
            p: {"bytes": r.get("bytes"), "mtime_ns": r.get("mtime_ns")} for p, r in kept[OUTPUTS].items()
        }
    kept[SLIM] = True
    return kept


def full_marker(stage_dir: Path, unit: str, marker: dict[str, Any]) -> dict[str, Any]:
    """`marker` itself, or for a slim one the marker file as it is now (empty when it is gone)."""
    return (read_marker(stage_dir, unit) or {}) if marker.get(SLIM) else marker


def _load(summary: Path) -> SummaryTable:
    key = str(summary)
    if key not in _memory:
        _memory[key] = SummaryTable(_read_table(Path(summary)))
    return _memory[key]


def _read_table(summary: Path) -> pa.Table:
    """The summary's table; an empty one when it is missing, of another version or damaged (it is
    only a cache: the markers are read again)."""
    try:  # read into memory, not mapped: a file truncated in place would kill a mapping's reader
        with pa.OSFile(str(summary)) as source:
            table = pa.ipc.open_file(source).read_all()
        if table.schema.metadata != SCHEMA.metadata or not table.schema.equals(SCHEMA):
            raise ValueError(f"version or columns differ ({table.schema.metadata})")
        table.validate(full=True)
        nulls = [n for n in ("unit", *KEY_COLUMNS, "rest") if table.column(n).null_count]
        if nulls:  # never written so: a damaged file
            raise ValueError(f"nulls in {', '.join(nulls)}")
        return table
    except FileNotFoundError:
        pass
    except (OSError, ValueError, pa.ArrowException) as err:
        log.debug("%s: unusable summary (%s); reading the markers", summary, err)
    return SCHEMA.empty_table()


def _store(summary: Path, old: SummaryTable, dropped: set[int], fresh: list[pa.Table]) -> SummaryTable:
    """The summary without the rows `dropped`, with the `fresh` rows (which replace any row of
    the same unit)."""
    keep = np.ones(len(old), dtype=bool)
    keep[list(dropped)] = False
    new_units = {unit for part in fresh for unit in part.column("unit").to_pylist()}
    keep &= np.fromiter((u not in new_units for u in old.units), dtype=bool, count=len(old))
    table = pa.concat_tables([old.table.filter(pa.array(keep)), *fresh]).combine_chunks()
    stored = _memory[str(summary)] = SummaryTable(table)
    try:
        Path(summary).with_suffix(".json").unlink(missing_ok=True)  # version 2's summary, in JSON
        remove_orphans(Path(summary).parent, Path(summary).name)  # a write a kill cut short
        with atomic_write(summary) as handle, pa.ipc.new_file(handle, SCHEMA) as writer:
            writer.write_table(table)
    except OSError as err:  # a read-only run root only costs speed
        log.debug("%s: not written (%s)", summary, err)
    return stored


def _fresh_table(stage_dir: Path, units: list[str], keys: np.ndarray, chosen: list[int]) -> pa.Table:
    """Rows of the markers of `units[i]` for i in `chosen`, read now (in pieces of CHUNK: the
    markers of 400,000 units are never all in memory as dicts)."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for i in chosen:
        marker = read_marker(stage_dir, units[i])
        if marker is None:  # removed between the stat and the read
            continue
        unit, key, marker = units[i], keys[i].tolist(), slim(marker)
        columns["unit"].append(unit)
        for name, value in zip(KEY_COLUMNS, key):
            columns[name].append(value)
        rest = {k: v for k, v in marker.items() if k not in ("fingerprint", OUTPUTS, SLIM)}
        fingerprint = marker.get("fingerprint")
        columns["fingerprint"].append(fingerprint if isinstance(fingerprint, str) else None)
        outputs = marker.get(OUTPUTS)
        columns[OUTPUTS].append(
            None
            if not isinstance(outputs, dict)
            else [
                {"path": p, "bytes": _int(r.get("bytes")), "mtime_ns": _int(r.get("mtime_ns"))}
                for p, r in outputs.items()
            ]
        )
        columns["rest"].append(json.dumps(rest, separators=(",", ":")))
    return pa.table(columns, schema=SCHEMA)


def _int(value: Any) -> int | None:
    """An int64 column's value; None (not recorded: the file is checked in full) for anything else."""
    usable = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return value if usable else None


def _signed(inode: int) -> int:
    """An inode number as int64 (overlayfs and some network file systems use all 64 bits)."""
    return inode - 2**64 if inode >= 2**63 else inode
