"""URL lists as they ship: one file, a folder or a glob of parquet/csv/tsv/jsonl files, read in pieces.

    files = resolve_url_files(Path("laion400m-meta/"), None)   # sorted by name, one format
    rows = count_rows(path, "parquet")                           # parquet: footer only
    for batch in iter_batches(path, "csv", ["url"]): ...         # streamed, bounded memory
    table = read_parquet_rows(path, 120_000, 130_000, ["url"])   # only the row groups it needs

The files of a folder or glob are taken in sorted name order (relative to the folder, or to the glob's
fixed prefix), so one global row numbering is stable: file k's rows follow those of files 0..k-1.
Nothing here holds more than one batch (or one parquet row group's pages) of a file in memory.
Errors are `TableError`s naming the file.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from shards.tables import TABLE_FORMATS, TableError, first_line, infer_format

BATCH_ROWS = 65_536
_GLOB_CHARS = "*?["


def is_glob(spec: str | Path) -> bool:
    return any(ch in str(spec) for ch in _GLOB_CHARS)


def glob_base(spec: str | Path) -> Path:
    """The folder a glob's matches are named relative to: its prefix without glob characters."""
    parts = Path(spec).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if is_glob(p))]]
    return Path(*fixed) if fixed else Path(".")


def resolve_url_files(spec: Path, fmt: str | None = None) -> tuple[Path, list[Path]]:
    """(base folder, the table files `spec` names in sorted name order, all of one format).

    A folder gives its files (recursively) whose suffix is a table format (`fmt`'s, when given);
    names starting with `.` or `_` (hidden files, `_SUCCESS`) are left out, as Spark writes them."""
    spec = Path(spec)
    if is_glob(spec):
        base = glob_base(spec)
        files = [Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file()]
    elif spec.is_dir():
        base = spec
        files = [p for p in spec.rglob("*") if p.is_file() and _is_table_file(p, base, fmt)]
    elif spec.is_file():
        return spec.parent, [spec]
    else:
        raise TableError(f"{spec}: URL table not found")
    if not files:
        what = f"{fmt} files" if fmt else f"table files ({', '.join(TABLE_FORMATS)})"
        raise TableError(f"{spec}: no {what} there")
    files.sort(key=lambda p: p.relative_to(base).as_posix())
    if fmt is None:
        formats = {infer_format(p) for p in files}
        if len(formats) > 1:
            raise TableError(
                f"{spec}: files of several formats ({', '.join(sorted(formats))}); set input_format"
            )
    return base, files


def _is_table_file(path: Path, base: Path, fmt: str | None) -> bool:
    if any(part.startswith((".", "_")) for part in path.relative_to(base).parts):
        return False
    try:
        return infer_format(path) == fmt if fmt else True
    except TableError:
        return False


def count_rows(path: Path, fmt: str) -> int:
    """Rows of one file: parquet from its footer, text formats by one streaming pass."""
    if fmt == "parquet":
        return _parquet_file(path).metadata.num_rows
    return sum(batch.num_rows for batch in iter_batches(path, fmt, None))


def iter_batches(
    path: Path, fmt: str, columns: list[str] | None, rows: int = BATCH_ROWS
) -> Iterator[pa.Table]:
    """The file's `columns` (None: all) as tables of about `rows` rows, streamed."""
    try:
        if fmt == "parquet":
            for batch in _parquet_file(path).iter_batches(batch_size=rows, columns=columns):
                yield pa.Table.from_batches([batch])
            return
        for batch in _text_reader(path, fmt, columns):
            table = pa.Table.from_batches([batch])
            yield table.select(columns) if columns and fmt == "jsonl" else table
    except KeyError as err:  # jsonl: a column missing from a later block
        raise TableError(f"{path}: no column {err.args[0]!r} in some rows") from None
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"{path}: not a readable {fmt} table ({first_line(err)})") from None


def _text_reader(path: Path, fmt: str, columns: list[str] | None):
    if fmt == "jsonl":
        return pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=1 << 22))
    parse = pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t")
    convert = pa_csv.ConvertOptions(include_columns=columns or [], strings_can_be_null=False)
    return pa_csv.open_csv(path, parse_options=parse, convert_options=convert)


def read_parquet_rows(path: Path, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows `[start, stop)` of one parquet file: only the row groups that hold them are read, batch
    by batch, so memory follows the slice (and one batch), not the file."""
    try:
        parquet = _parquet_file(path)
        groups, first_row = _row_groups_between(parquet.metadata, start, stop)
        pieces, position = [], first_row
        # one thread: with threads every column of the row group is decoded at once, here page by page
        batches = parquet.iter_batches(batch_size=8192, row_groups=groups, columns=columns, use_threads=False)
        for batch in batches:
            lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
            if hi > lo:
                pieces.append(batch.slice(lo, hi - lo))
            position += batch.num_rows
            if position >= stop:
                break
        schema = parquet.schema_arrow
        empty = pa.schema([schema.field(c) for c in columns])
        return pa.Table.from_batches(pieces, schema=pieces[0].schema if pieces else empty)
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"{path}: not a readable parquet table ({first_line(err)})") from None


def _row_groups_between(metadata, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups overlapping `[start, stop)` and the file row their first one starts at."""
    groups, first_row, row = [], None, 0
    for index in range(metadata.num_row_groups):
        count = metadata.row_group(index).num_rows
        if row < stop and row + count > start:
            groups.append(index)
            first_row = row if first_row is None else first_row
        row += count
    return groups, first_row or 0


def _parquet_file(path: Path) -> pq.ParquetFile:
    # buffered reads, no pre-buffering: a row group's pages are read as the batches need them
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
