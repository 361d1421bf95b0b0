"""A stage's markers as the whole-stage view sees them: columns of the marker summary, decoded lazily.

    view = marker_summary.read_all_markers(stage_dir, units, summary)   # a MarkerView
    current = with_fingerprint(view, fingerprint)    # vectorized on the summary's columns
    changed = units_with_changed_outputs(stage_dir, current)   # one stat per recorded file
    counts = merged(current, stage.merge_counts)     # cached while the same markers are there

A `MarkerView` is a mutable mapping unit -> slim marker (shards/marker_summary.py says what is kept)
whose markers are decoded from the summary's columns only when one is asked for: `status` on 400,000
units touches none of them. The three functions above also take a plain dict of markers (a rank's
own share, read directly), so a caller needs no second path.

`merged` keeps the merged counts in `<summary>.counts.json`, keyed by a digest of the markers it
merged (unit names and each marker file's inode, size, mtime and ctime) and of the code of the merge
function and of the functions it calls: any marker written, replaced, edited or removed since gives
another digest, so the cache is used only for exactly the markers it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import marshal
import os
import time
import types
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import markers
from shards.atomic import remove_orphans, write_text_atomic
from shards.markers import OUTPUTS, read_marker

log = logging.getLogger(__name__)

SLIM = "slim"  # a marker as the summary keeps it
KEY_COLUMNS = ("ino", "size", "mtime_ns", "ctime_ns")  # of the marker file: what the entry is valid for
MISSING = -2  # the size of a file that is gone (never a real size, nor the -1 of "not recorded")
NOT_RECORDED = -1
DECODED_KEPT = 4096


class SummaryTable:
    """The summary's Arrow table with the columns the view needs, each converted once."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.stage_dir: Path | None = None  # set by marker_summary.read_all_markers
        self.decoded: dict[int, dict[str, Any]] = {}  # row -> its marker, the last DECODED_KEPT asked

    def __len__(self) -> int:
        return self.table.num_rows

    @cached_property
    def units(self) -> list[str]:
        return self.table.column("unit").to_pylist()

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {unit: row for row, unit in enumerate(self.units)}

    @cached_property
    def keys(self) -> np.ndarray:
        """(rows, 4) int64: each marker file's inode, size, mtime_ns, ctime_ns."""
        if not len(self):
            return np.zeros((0, len(KEY_COLUMNS)), dtype=np.int64)
        return np.stack([self.table.column(c).to_numpy() for c in KEY_COLUMNS], axis=1)

    def has_fingerprint(self, fingerprint: str) -> np.ndarray:
        """(rows,) bool: the row's marker was made with `fingerprint`."""
        same = pc.equal(self.table.column("fingerprint"), pa.scalar(fingerprint, pa.string()))
        return np.asarray(same.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)

    @cached_property
    def rest(self) -> list[str]:
        return self.table.column("rest").to_pylist()

    @cached_property
    def _outputs(self) -> pa.ListArray:
        return self.table.column(OUTPUTS).combine_chunks()

    @cached_property
    def has_outputs(self) -> np.ndarray:
        return ~np.asarray(self._outputs.is_null().to_numpy(zero_copy_only=False), dtype=bool)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Row r's recorded files are the flat entries offsets[r]:offsets[r + 1]."""
        return self._outputs.offsets.to_numpy().astype(np.int64)

    @cached_property
    def flat(self) -> pa.StructArray:
        values = self._outputs.values
        start, end = (int(x) for x in self.offsets[[0, -1]]) if len(self) else (0, 0)
        return values.slice(start, end - start) if len(self) else values

    @cached_property
    def paths(self) -> list[str]:
        return self.flat.field("path").to_pylist()

    @cached_property
    def _records(self) -> tuple[list, list, list, list]:
        """Python lists for decoding rows: flat bytes and mtimes, row offsets, fingerprints."""
        base = int(self.offsets[0]) if len(self) else 0
        offsets = [int(x) - base for x in self.offsets.tolist()]
        fields = (self.flat.field(name).to_pylist() for name in ("bytes", "mtime_ns"))
        return (*fields, offsets, self.table.column("fingerprint").to_pylist())

    def flat_ints(self, name: str) -> np.ndarray:
        """A flat output field as int64, a missing value as NOT_RECORDED."""
        return self.flat.field(name).fill_null(NOT_RECORDED).to_numpy(zero_copy_only=False)

    def flat_index(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The flat output entries of `rows` and, for each, its position in `rows`."""
        base = self.offsets[0] if len(self) else 0
        starts, lengths = self.offsets[rows] - base, self.offsets[rows + 1] - self.offsets[rows]
        owner = np.repeat(np.arange(len(rows)), lengths)
        before = np.cumsum(lengths) - lengths
        return np.arange(int(lengths.sum())) - np.repeat(before, lengths) + np.repeat(starts, lengths), owner

    def marker(self, row: int) -> dict[str, Any]:
        """Row `row` as a slim marker (a plain dict). The last few thousand asked for are kept (a
        caller reading three fields decodes once); not all, or a pass over 400,000 markers would
        keep them all in memory."""
        marker = self.decoded.get(row)
        if marker is None:
            if len(self.decoded) >= DECODED_KEPT:
                self.decoded.clear()
            marker = self.decoded[row] = self._decode(row)
        return marker

    def _decode(self, row: int) -> dict[str, Any]:
        try:
            marker = json.loads(self.rest[row])
            if not isinstance(marker, dict):
                raise ValueError(f"a {type(marker).__name__}, not an object")
        except ValueError as err:  # a damaged summary: the marker itself, as the first read did
            log.debug(
                "summary row %d (%s) does not decode (%s): reading its marker", row, self.units[row], err
            )
            found = read_marker(self.stage_dir, self.units[row]) if self.stage_dir else None
            return {**(found or {}), SLIM: False}
        sizes, mtimes, offsets, fingerprints = self._records
        if fingerprints[row] is not None:
            marker["fingerprint"] = fingerprints[row]
        if self.has_outputs[row]:
            paths = self.paths
            marker[OUTPUTS] = {
                paths[j]: {"bytes": sizes[j], "mtime_ns": mtimes[j]}
                for j in range(offsets[row], offsets[row + 1])
            }
        marker[SLIM] = True
        return marker


class MarkerView(MutableMapping):
    """unit -> slim marker over a `SummaryTable`'s rows (in the order the units were asked for);
    a marker set here (a unit just finished) is kept as given."""

    def __init__(self, summary: SummaryTable, rows: dict[str, int], counts_file: Path | None) -> None:
        self.summary, self._rows, self.counts_file = summary, rows, counts_file
        self._set: dict[str, dict[str, Any]] = {}  # markers set by the caller (row NOT_RECORDED)

    def subset(self, units: list[str]) -> MarkerView:
        """The view of `units` (each in this one), in that order."""
        same = len(units) == len(self._rows) and all(a == b for a, b in zip(units, self._rows))
        rows = dict(self._rows) if same else {u: self._rows[u] for u in units}
        view = MarkerView(self.summary, rows, self.counts_file)
        view._set = {u: self._set[u] for u in units if u in self._set}
        return view

    def __getitem__(self, unit: str) -> dict[str, Any]:
        row = self._rows[unit]
        return self._set[unit] if row < 0 else self.summary.marker(row)

    def __setitem__(self, unit: str, marker: dict[str, Any]) -> None:
        self._rows[unit] = NOT_RECORDED  # no longer the summary's row
        self._set[unit] = marker

    def __delitem__(self, unit: str) -> None:
        del self._rows[unit]
        self._set.pop(unit, None)

    def __contains__(self, unit: object) -> bool:
        return unit in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def summary_rows(self) -> tuple[list[str], np.ndarray]:
        """The units still as the summary has them, and their rows."""
        rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        if (rows >= 0).all():
            return list(self._rows), rows
        return [u for u, r in self._rows.items() if r >= 0], rows[rows >= 0]

    def given(self) -> list[str]:
        return list(self._set)


def with_fingerprint(found: Mapping[str, dict[str, Any]], fingerprint: str) -> Mapping[str, dict[str, Any]]:
    """The markers of `found` made with `fingerprint` (a view stays a view)."""
    return _kept(
        found,
        lambda summary: summary.has_fingerprint(fingerprint),
        lambda m: m.get("fingerprint") == fingerprint,
    )


def recorded(found: Mapping[str, dict[str, Any]]) -> Mapping[str, dict[str, Any]]:
    """The markers of `found` with a record of their files (a view stays a view)."""
    return _kept(found, lambda summary: summary.has_outputs, lambda m: m.get(OUTPUTS) is not None)


def _kept(found, rows_kept: Callable[[SummaryTable], np.ndarray], marker_kept: Callable[[dict], bool]):
    """The markers of `found` that `marker_kept` keeps; for a view's summary rows, decided on the
    columns by `rows_kept(summary)` (a bool per row), the same test without decoding."""
    if not isinstance(found, MarkerView):
        return {u: m for u, m in found.items() if marker_kept(m)}
    units, rows = found.summary_rows()
    kept = {u for u, keep in zip(units, rows_kept(found.summary)[rows].tolist()) if keep}
    kept.update(u for u in found.given() if marker_kept(found[u]))
    return found.subset([u for u in found if u in kept])


def without(found: Mapping[str, dict[str, Any]], units: Mapping | set) -> Mapping[str, dict[str, Any]]:
    if isinstance(found, MarkerView):
        return found.subset([u for u in found if u not in units])
    return {u: m for u, m in found.items() if u not in units}


def in_order(found: Mapping[str, dict[str, Any]], units: list[str]) -> Mapping[str, dict[str, Any]]:
    """The markers of `found` in the order of `units` (a merge's order, for sums of floats)."""
    if isinstance(found, MarkerView):
        return found.subset([u for u in units if u in found])
    return {u: found[u] for u in units if u in found}


def newest_marker_ns(stage_dir: Path, found: Mapping[str, dict[str, Any]]) -> int:
    """The latest mtime (ns) of the marker files of `found`: from the summary's stat of them for
    a view (a marker set since counts as now), else one stat each."""
    if isinstance(found, MarkerView):
        _, rows = found.summary_rows()
        newest = int(found.summary.keys[rows, 2].max()) if len(rows) else 0
        return max(newest, time.time_ns()) if found.given() else newest
    newest = 0
    for unit in found:
        try:
            newest = max(newest, os.stat(markers.marker_path(stage_dir, unit)).st_mtime_ns)
        except OSError:
            newest = time.time_ns()  # gone since: as good as changed
    return newest


def units_with_changed_outputs(
    stage_dir: Path, found: Mapping[str, dict[str, Any]], changed: Callable[..., bool]
) -> list[str]:
    """The units whose recorded files have another size or mtime than recorded, or are gone:
    one stat per file, relative to the stage folder. `changed(stage_dir, marker, folder_fd)` is the
    per-marker check, used for markers that are not (or no longer) the summary's rows."""
    try:
        folder_fd = os.open(stage_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        folder_fd = None
    try:
        if not isinstance(found, MarkerView):
            return [u for u, m in found.items() if changed(stage_dir, m, folder_fd)]
        result = set(u for u in found.given() if changed(stage_dir, found[u], folder_fd))
        result.update(_changed_rows(stage_dir, found, folder_fd))
        return [u for u in found if u in result]
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def _changed_rows(stage_dir: Path, view: MarkerView, folder_fd: int | None) -> list[str]:
    units, rows = view.summary_rows()
    summary = view.summary
    flat, owner = summary.flat_index(rows)
    paths = summary.paths
    sizes = np.empty(len(flat), dtype=np.int64)
    mtimes = np.empty(len(flat), dtype=np.int64)
    for i, entry in enumerate(flat.tolist()):
        try:
            stat = os.stat(
                paths[entry] if folder_fd is not None else Path(stage_dir) / paths[entry], dir_fd=folder_fd
            )
            sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
        except OSError:
            sizes[i], mtimes[i] = MISSING, MISSING
    want_mtime = summary.flat_ints("mtime_ns")[flat]
    differs = (sizes != summary.flat_ints("bytes")[flat]) | (
        (want_mtime != NOT_RECORDED) & (mtimes != want_mtime)
    )
    return [units[i] for i in np.unique(owner[differs]).tolist()]


def merged(
    found: Mapping[str, dict[str, Any]], merge_counts: Callable[[list], dict[str, Any]]
) -> dict[str, Any]:
    """`merge_counts` of the markers of `found` in its order; for a view of the summary's own rows,
    kept in its counts file while exactly these markers are there."""
    digest = _digest(found, merge_counts) if isinstance(found, MarkerView) else None
    if digest is None:
        return merge_counts(Markers(found))
    cache = _read_counts(found.counts_file)
    if isinstance(cache.get(digest), dict):
        return cache[digest]
    counts = merge_counts(Markers(found))
    try:  # one entry per merge (a stage's `status`, its finish): a few at most
        remove_orphans(found.counts_file.parent, found.counts_file.name)  # a write a kill cut short
        write_text_atomic(found.counts_file, json.dumps({**dict(list(cache.items())[-3:]), digest: counts}))
    except (OSError, TypeError, ValueError) as err:  # only a cache
        log.debug("%s: not written (%s)", found.counts_file, err)
    return counts


class Markers(Sequence):
    """The markers of a mapping as a sequence, each decoded as it is reached: a merge that goes
    through them once holds one at a time, not all 400,000."""

    def __init__(self, found: Mapping[str, dict[str, Any]]) -> None:
        self.found, self.units = found, list(found)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.found[u] for u in self.units[index]]
        return self.found[self.units[index]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.found[u] for u in self.units)


def _digest(view: MarkerView, merge_counts: Callable) -> str | None:
    if view.counts_file is None or view.given():  # a marker just written is not in the summary yet
        return None
    if not isinstance(merge_counts, types.FunctionType):  # a partial, a callable object: not cached
        return None
    units, rows = view.summary_rows()
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{merge_counts.__module__}.{merge_counts.__qualname__}".encode())
    hasher.update(_merge_sources(merge_counts))  # the same bytes for the same source
    hasher.update(np.ascontiguousarray(view.summary.keys[rows]).tobytes())
    hasher.update("\0".join(units).encode())
    return hasher.hexdigest()


def _merge_sources(merge_counts: types.FunctionType) -> bytes:
    """The code of the merge function and of the functions it calls by name, and theirs
    (`sum_counts`, `add_counts`): counts merged by other code are not reused."""
    seen, todo, parts = set(), [merge_counts], []
    while todo:
        function = todo.pop()
        if function in seen or len(seen) > 32:
            continue
        seen.add(function)
        parts.append(marshal.dumps(function.__code__))
        names = function.__code__.co_names
        todo += [f for f in (function.__globals__.get(n) for n in names) if isinstance(f, types.FunctionType)]
    return hashlib.blake2b(b"\0".join(sorted(parts)), digest_size=16).digest()


def _read_counts(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
