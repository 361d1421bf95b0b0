"""Tables with pyarrow: reading input tables (parquet, csv, tsv, jsonl) and writing parquet sidecars.

Every error names the file; sidecars are written atomically beside their shard.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from shards.atomic import atomic_write

TABLE_FORMATS = ("parquet", "csv", "tsv", "jsonl")


class TableError(ValueError):
    """An input table that cannot be read or lacks a column; the message names the file."""


def infer_format(path: Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    aliases = {"json": "jsonl", "ndjson": "jsonl", "txt": "tsv"}
    fmt = aliases.get(suffix, suffix)
    if fmt not in TABLE_FORMATS:
        raise TableError(f"{path}: cannot tell the table format from '.{suffix}'; set input_format")
    return fmt


def _read_any(path: Path, fmt: str, columns: list[str] | None) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path, columns=columns)
    if fmt in ("csv", "tsv"):
        parse = pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t")
        convert = pa_csv.ConvertOptions(include_columns=columns, strings_can_be_null=False)
        return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    table = pa_json.read_json(path)
    return table.select(columns) if columns else table


def check_columns(path: Path, fmt: str | None = None, columns: list[str] | None = None) -> str:
    """Check, reading as little as the format allows, that the table opens and has `columns`;
    return its format. Raises `TableError` naming the file and the column."""
    path = Path(path)
    fmt = fmt or infer_format(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    try:
        names = table_columns(path, fmt)
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"{path}: not a readable {fmt} table ({first_line(err)})") from err
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise TableError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    return fmt


def read_table(path: Path, fmt: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read `columns` of a table; a missing column or an unreadable file is a `TableError`."""
    fmt = check_columns(path, fmt, columns)
    try:
        return _read_any(path, fmt, columns)
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"{path}: not a readable {fmt} table ({first_line(err)})") from err


def table_columns(path: Path, fmt: str) -> list[str]:
    """Column names, reading as little as the format allows."""
    if fmt == "parquet":
        return pq.read_schema(path).names
    if fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        reader = pa_csv.open_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
        return reader.schema.names
    return pa_json.open_json(path).schema.names  # the first block only, not the whole file


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    with atomic_write(path) as handle:
        pq.write_table(table, handle)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)
