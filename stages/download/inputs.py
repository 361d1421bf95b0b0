"""The download stage's input: the URL files, their identity recorded once per run root, a unit's rows.

Reads  the files `url_list` names (a file, a folder or a glob; shards/url_files.py) and
       `<root>/images/_input/record.json`.
Writes `<root>/images/_input/record.json`: per file its name, size, mtime_ns, sha256 and row count,
       and the class names of the label column (csv/tsv/jsonl inputs are split into per-unit files
       once: stages/download/input_split.py).

The first process that needs the record computes it under `logs/locks/download-input.lock`,
hashing each file once; every other rank and node waits for it and then only compares each file's
size and mtime with it, so nobody hashes the table again. A file whose size or mtime changed is
hashed again: the same content updates the record; other content, or a file added or removed, is
one error naming the file while units are done (with `--force` the record is updated and the new
fingerprint redoes them).
Row `r` of the whole input is row `r - offset(k)` of file `k` (files in sorted name order).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from shards import markers
from shards.atomic import write_json_atomic
from shards.identity import sha256_of
from shards.locks import FileLock, LockHeld, LockUnusable
from shards.naming import list_shards, shard_name
from shards.tables import TableError, check_columns, first_line, infer_format
from shards.url_files import count_rows, iter_batches, read_parquet_rows, resolve_url_files
from stages.errors import StageConfigError, StageError

log = logging.getLogger(__name__)

ROW_COLUMN = "mcip_row"  # the global row number, carried through img2dataset
LOCK_TIMEOUT_S = 6 * 3600.0  # hashing a few hundred GB on a slow shared file system


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # relative to the folder (or the glob's fixed prefix)
    size: int
    mtime_ns: int
    sha256: str
    rows: int


class InputRecord(BaseModel):
    """`_input/record.json`: what the run's URL files were when it started."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    format: str
    columns: list[str]  # the columns checked in every file
    files: list[InputFile]
    label_col: str | None = None
    labels: list[Any] | None = None

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def sha256(self) -> str:
        """The input's content identity: one file's own sha256 (as before folders were taken), or
        the hash of every file's name and sha256 in order."""
        if len(self.files) == 1:
            return self.files[0].sha256
        lines = "".join(f"{f.name}\t{f.sha256}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class UrlInput:
    """The URL files of a run with their record: row counts, labels, and reading a unit's rows."""

    cfg: Any  # DownloadConfig
    root: Path
    paths: list[Path]
    record: InputRecord

    def __post_init__(self) -> None:
        self.offsets = [0]
        for entry in self.record.files:
            self.offsets.append(self.offsets[-1] + entry.rows)

    @property
    def num_rows(self) -> int:
        return self.record.total_rows

    @property
    def sha256(self) -> str:
        return self.record.sha256

    @property
    def labels(self) -> list[Any] | None:
        return self.record.labels

    def read_range(self, start: int, stop: int) -> pa.Table:
        """Global rows `[start, stop)`: url, caption, cls, the additional columns and `mcip_row`."""
        if self.record.format != "parquet":
            return self._read_split_range(start, stop)
        pieces = []
        first = bisect.bisect_right(self.offsets, start) - 1
        for k in range(max(first, 0), len(self.paths)):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b > a:
                raw = read_parquet_rows(self.paths[k], a, b, wanted_columns(self.cfg))
                pieces.append(normalize(raw, self.cfg, self.paths[k], lo + a, self.labels))
        return concat_tables(pieces)

    def read_rows(self, rows: list[int]) -> pa.Table:
        """The given global rows (a retry shard's), read unit range by unit range, in that order."""
        size = self.cfg.samples_per_shard
        bases = sorted({row // size for row in rows})
        whole = concat_tables([self.read_range(b * size, min((b + 1) * size, self.num_rows)) for b in bases])
        position = {row: i for i, row in enumerate(whole[ROW_COLUMN].to_pylist())}
        return whole.take(pa.array([position[row] for row in rows], pa.int64()))

    def _read_split_range(self, start: int, stop: int) -> pa.Table:
        from stages.download.input_split import split_folder

        folder = split_folder(self.root, self.cfg, self.record)
        size = self.cfg.samples_per_shard
        tables = []
        for unit in range(start // size, (stop - 1) // size + 1):
            table = pa.ipc.open_file(folder / f"{shard_name(unit)}.arrow").read_all()
            tables.append(
                table.filter(
                    pc.and_(pc.greater_equal(table[ROW_COLUMN], start), pc.less(table[ROW_COLUMN], stop))
                )
            )
        return _with_cls(concat_tables(tables), self.cfg, self.labels)


def wanted_columns(cfg) -> list[str]:
    names = [cfg.url_col, cfg.caption_col, cfg.label_col, *cfg.save_additional_columns]
    return list(dict.fromkeys(c for c in names if c))


def normalize(raw: pa.Table, cfg, path: Path, first_row: int, labels: list[Any] | None) -> pa.Table:
    """The stage's columns from a file's piece: url and caption as UTF-8 text (an error names the
    file and column), the label as it is, the additional columns as they are, and `mcip_row`."""
    columns: dict[str, Any] = {"url": _text_column(raw, cfg.url_col, path)}
    if cfg.caption_col:
        columns["caption"] = _text_column(raw, cfg.caption_col, path)
    if cfg.label_col:
        columns["label"] = raw[cfg.label_col]
    for name in cfg.save_additional_columns:
        columns[name] = raw[name]
    columns[ROW_COLUMN] = pa.array(range(first_row, first_row + raw.num_rows), pa.int64())
    return _with_cls(pa.table(columns), cfg, labels) if labels is not None else pa.table(columns)


def _with_cls(table: pa.Table, cfg, labels: list[Any] | None) -> pa.Table:
    """Replace the raw `label` column by its class index `cls` (the record's sorted class names)."""
    if "label" not in table.column_names or labels is None:
        return table
    index = {label: i for i, label in enumerate(labels)}
    values = table["label"].to_pylist()
    try:
        cls = [index[v] for v in values]
    except KeyError as err:  # not in the record's classes: the file changed under the run
        raise StageConfigError(
            f"{cfg.url_list}: label {err.args[0]!r} is not among the recorded classes; "
            "the URL files changed since the run started (rerun with --force)"
        ) from None
    return table.drop_columns(["label"]).append_column("cls", pa.array(cls, pa.int64()))


def _text_column(raw: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    """The column as UTF-8 strings; a list column or bytes that are not UTF-8 is an error naming it."""
    try:
        return pc.cast(raw[name], pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise StageConfigError(
            f"{path}: column {name!r} ({raw[name].type}) cannot be read as UTF-8 text: {first_line(err)}"
        ) from None


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows] or tables[:1]
    if not tables:
        return pa.table({ROW_COLUMN: pa.array([], pa.int64())})
    return pa.concat_tables(tables, promote_options="permissive")


# ---- the record ------------------------------------------------------------------------------------


def input_folder(root: Path) -> Path:
    return Path(root) / "images" / "_input"


def input_lock(root: Path) -> Path:
    """Held while the record is computed or the text files are split (with the other run locks)."""
    return Path(root) / "logs" / "locks" / "download-input.lock"


def open_input(cfg, root: Path, force: bool = False) -> UrlInput:
    """The run's URL files and their record: read, checked by size and mtime, or computed once."""
    try:
        base, paths = resolve_url_files(cfg.url_list, cfg.input_format)
    except TableError as err:
        raise StageConfigError(str(err)) from None
    names = [p.relative_to(base).as_posix() for p in paths]
    record_path = input_folder(root) / "record.json"
    record = _read_record(record_path)
    if not _is_current(record, cfg, names, paths):
        with waiting_lock(input_lock(root), "the URL files' record"):
            record = _read_record(record_path)  # another rank may have written it meanwhile
            if not _is_current(record, cfg, names, paths):
                record = _updated_record(record, cfg, names, paths, root, force)
                write_json_atomic(record_path, record.model_dump(mode="json"))
    url_input = UrlInput(cfg, Path(root), paths, record)
    if record.total_rows == 0:
        raise StageConfigError(f"{cfg.url_list}: the URL table has no rows")
    return url_input


def _read_record(path: Path) -> InputRecord | None:
    """The record, or None when missing or unreadable (it is computed again: it is only a record)."""
    try:
        return InputRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as err:
        log.warning("%s: unreadable (%s); computing it again", path, str(err).splitlines()[0])
        return None


def _is_current(record: InputRecord | None, cfg, names: list[str], paths: list[Path]) -> bool:
    if record is None or record.format != _format(cfg, paths) or [f.name for f in record.files] != names:
        return False
    if not set(wanted_columns(cfg)) <= set(record.columns) or record.label_col != cfg.label_col:
        return False
    for entry, path in zip(record.files, paths):
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
            return False
    return True


def _format(cfg, paths: list[Path]) -> str:
    return cfg.input_format or infer_format(paths[0])


def _updated_record(
    old: InputRecord | None, cfg, names: list[str], paths: list[Path], root: Path, force: bool
) -> InputRecord:
    """Hash and count the files that are new or whose size/mtime changed (others as recorded);
    a change of content while units are done is an error naming the file, unless `force`."""
    fmt = _format(cfg, paths)
    known = {f.name: f for f in old.files} if old and old.format == fmt else {}
    columns = wanted_columns(cfg)
    reuse_columns = old is not None and set(columns) <= set(old.columns)
    files = []
    for name, path in tqdm(list(zip(names, paths)), desc="URL files: record", unit="file", leave=False):
        stat = path.stat()
        entry = known.get(name)
        if entry and (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            if not reuse_columns:  # other columns wanted now: their presence, not the hash, is new
                _check_file_columns(path, fmt, cfg)
        else:
            entry = _file_entry(name, path, fmt, cfg, stat, entry)
        files.append(entry)
    record = InputRecord(format=fmt, columns=columns, files=files, label_col=cfg.label_col)
    if record.total_rows == 0:  # what is wrong with the files themselves comes first
        raise StageConfigError(f"{cfg.url_list}: the URL table has no rows")
    changes = _content_changes(old, record)
    labels_unchanged = old and old.labels is not None and old.label_col == cfg.label_col and not changes
    if cfg.label_col:  # its own errors (an empty label) before the change is reported
        record.labels = old.labels if labels_unchanged else _scan_labels(cfg, paths, fmt)
    if changes and not force and _has_done_units(root):
        shown = "; ".join(changes[:3]) + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
        raise StageConfigError(
            f"url_list {cfg.url_list} changed since this run recorded it ({shown}); "
            "its shards would no longer match: rerun with --force to redo the download"
        )
    return record


def _check_file_columns(path: Path, fmt: str, cfg) -> None:
    """The file opens and has the wanted columns; parquet's url and caption columns are of a type
    that reads as text (text formats: checked row by row when counted)."""
    try:
        check_columns(path, fmt, wanted_columns(cfg))
    except TableError as err:
        raise StageConfigError(str(err)) from None
    if fmt == "parquet":
        empty = pq.read_schema(path).empty_table()
        for name in text_columns(cfg):
            _text_column(empty, name, path)


def text_columns(cfg) -> list[str]:
    return [c for c in (cfg.url_col, cfg.caption_col) if c]


def _file_entry(name: str, path: Path, fmt: str, cfg, stat, old: InputFile | None) -> InputFile:
    _check_file_columns(path, fmt, cfg)
    digest = sha256_of(path)
    if old is not None and old.sha256 == digest:  # touched, not changed
        rows = old.rows
    else:
        rows = _count_checked(path, fmt, cfg) if fmt != "parquet" else count_rows(path, fmt)
    return InputFile(name=name, size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=digest, rows=rows)


def _count_checked(path: Path, fmt: str, cfg) -> int:
    """A text file's rows, by one pass that also parses its columns and reads its url and caption
    as UTF-8 text (an error names the file and the column)."""
    rows = 0
    for batch in read_batches(path, fmt, wanted_columns(cfg)):
        for name in text_columns(cfg):
            _text_column(batch, name, path)
        rows += batch.num_rows
    return rows


def _content_changes(old: InputRecord | None, new: InputRecord) -> list[str]:
    if old is None:
        return []
    before = {f.name: f for f in old.files}
    after = {f.name: f for f in new.files}
    changes = [f"{n} was added" for n in after if n not in before]
    changes += [f"{n} is gone" for n in before if n not in after]
    changes += [
        f"{n} changed (size {before[n].size} -> {after[n].size}, sha256 {before[n].sha256[:12]} -> "
        f"{after[n].sha256[:12]})"
        for n in after
        if n in before and before[n].sha256 != after[n].sha256
    ]
    return changes


def _has_done_units(root: Path) -> bool:
    done = Path(root) / "images" / markers.DONE_DIR
    return bool(list_shards(done, ".json")) if done.is_dir() else False


def _scan_labels(cfg, paths: list[Path], fmt: str) -> list[Any]:
    """The sorted class names of the label column, read column-only in batches; an empty label is
    an error naming its global row."""
    values: set[Any] = set()
    missing, first_missing, row = 0, None, 0
    for path in tqdm(paths, desc="URL files: labels", unit="file", leave=False):
        for batch in read_batches(path, fmt, [cfg.label_col]):
            for i, value in enumerate(batch[cfg.label_col].to_pylist()):
                if value is None or value == "" or value != value:  # value != value: NaN
                    missing += 1
                    first_missing = row + i if first_missing is None else first_missing
                else:
                    values.add(value)
            row += batch.num_rows
    if missing:
        raise StageConfigError(
            f"{cfg.url_list}: column {cfg.label_col!r} is empty in row {first_missing} "
            f"({missing} rows without a label)"
        )
    kinds = {type(v) for v in values}
    return sorted(values) if len(kinds) == 1 else sorted(values, key=str)


def read_batches(path: Path, fmt: str, columns: list[str]):
    try:
        yield from iter_batches(path, fmt, columns)
    except TableError as err:
        raise StageConfigError(str(err)) from None


# ---- waiting for a lock ----------------------------------------------------------------------------


class waiting_lock:
    """`with waiting_lock(path, what):` holds the lock file, waiting (bounded) while another process
    holds it; the wait says who holds it every minute."""

    def __init__(self, path: Path, what: str, timeout_s: float = LOCK_TIMEOUT_S, poll_s: float = 0.2):
        self.lock, self.what, self.timeout_s, self.poll_s = FileLock(path), what, timeout_s, poll_s

    def __enter__(self):
        started, said = time.monotonic(), 0.0
        while True:
            try:
                return self.lock.__enter__()
            except LockUnusable as err:  # a folder or a file where the lock should be: one line
                raise StageError(f"{self.what}: {err}") from None
            except LockHeld as held:
                waited = time.monotonic() - started
                if waited > self.timeout_s:
                    raise StageError(f"waited {waited:.0f} s for {self.what} ({held}); giving up") from None
                if waited - said >= 60:
                    log.info("waiting for %s (%s)", self.what, held)
                    said = waited
                time.sleep(self.poll_s)

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)


def deep_check(cfg) -> None:
    """Every row of the url and caption columns reads as UTF-8 text, file by file in batches (what
    `validate` checks beyond the headers). Parquet string columns are UTF-8 by type: not read."""
    try:
        _, paths = resolve_url_files(cfg.url_list, cfg.input_format)
    except TableError as err:
        raise StageConfigError(str(err)) from None
    fmt = _format(cfg, paths)
    text = text_columns(cfg)
    for path in paths:
        if fmt == "parquet":
            schema = pq.read_schema(path)
            columns = [c for c in text if c in schema.names and not pa.types.is_string(schema.field(c).type)]
        else:
            columns = text
        if not columns:
            continue
        for batch in read_batches(path, fmt, columns):
            for name in columns:
                _text_column(batch, name, path)
