"""csv, tsv and jsonl URL files split once into per-unit files, so that a rank opens only its rows.

Reads  the URL files of a run (stages/download/inputs.py), in their global row order.
Writes `<root>/images/_input/split-<samples_per_shard>-<fingerprint>/<unit>.arrow` (the unit's rows:
       url, caption, raw label, additional columns, `mcip_row`) and `_SPLIT.json` last.

Parquet needs no split (its row groups are read directly). Whichever rank needs the split first
writes it under the record's lock while the others wait, as img2dataset splits its own input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from shards.atomic import atomic_write, write_json_atomic
from shards.naming import shard_name
from stages.download.inputs import (
    UrlInput,
    concat_tables,
    input_folder,
    input_lock,
    normalize,
    read_batches,
    waiting_lock,
    wanted_columns,
)

SPLIT_DONE = "_SPLIT.json"


def split_folder(root: Path, cfg, record) -> Path:
    return input_folder(root) / f"split-{cfg.samples_per_shard}-{record.sha256[:16]}"


def ensure_split(url_input: UrlInput) -> None:
    """Text formats: write each unit's rows to `split-.../<unit>.arrow` once (whoever comes first,
    under the record's lock; the others wait), so a rank reads only its own rows afterwards."""
    if url_input.record.format == "parquet":
        return
    folder = split_folder(url_input.root, url_input.cfg, url_input.record)
    if (folder / SPLIT_DONE).exists():
        return
    with waiting_lock(input_lock(url_input.root), "the split of the URL files"):
        if (folder / SPLIT_DONE).exists():
            return
        for old in input_folder(url_input.root).glob("split-*"):
            shutil.rmtree(old, ignore_errors=True)  # an earlier input's or shard size's
        _write_split(url_input, folder)


def _write_split(url_input: UrlInput, folder: Path) -> None:
    cfg, size = url_input.cfg, url_input.cfg.samples_per_shard
    folder.mkdir(parents=True, exist_ok=True)
    pending: list[pa.Table] = []
    held, unit = 0, 0
    progress = tqdm(total=url_input.num_rows, desc="URL files: split", unit="row", leave=False)
    for path, first in zip(url_input.paths, url_input.offsets):
        row = first
        for batch in read_batches(path, url_input.record.format, wanted_columns(cfg)):
            pending.append(normalize(batch, cfg, path, row, None))
            row, held = row + batch.num_rows, held + batch.num_rows
            while held >= size:
                whole = concat_tables(pending)
                _write_unit_rows(folder / f"{shard_name(unit)}.arrow", whole.slice(0, size))
                pending, held, unit = [whole.slice(size)], held - size, unit + 1
            progress.update(batch.num_rows)
    if held:
        _write_unit_rows(folder / f"{shard_name(unit)}.arrow", concat_tables(pending))
    progress.close()
    write_json_atomic(folder / SPLIT_DONE, {"rows": url_input.num_rows, "samples_per_shard": size})


def _write_unit_rows(path: Path, table: pa.Table) -> None:
    with atomic_write(path) as handle:
        with pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
