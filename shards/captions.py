"""Caption shards: the schema, the writer and the reader of `captions/<set>/<shard>.parquet`.

One row per image of the image shard `images/<shard>.tar`, in the tar's key order:

    key       string          the image's key in the tar
    captions  list<string>    its pseudo-captions, best first when scored (may be empty)
    scores    list<float32>   their CLIP cosines, or null when the backend gives none
    backend   string          the caption backend, e.g. "retrieval"
    model     string          the captioning model as named in the manifest
    prompts   list<string>    the prompts as written in the manifest
    seed      int64           the seed the captions were drawn with
    dropped   list<struct<text: string, score: float32, reason: string>>
                              optional: the captions the filter removed and why ("duplicate",
                              "fewer than 3 words", "below min_score 0.2", "beyond keep_top 5");
                              null in shards written before it existed or by writers that omit it
    failure   string          optional: why the image has no captions when its backend failed on it
                              (the `server` backend: "HTTP 500: ...", "no whole answer within
                              deadline_s=600"); null when it did not fail, in shards written before
                              the column existed, and for corrupt images (counted apart)

A caption set is named by the folder under `captions/`; `ALT_TEXT` ("alt") is the reserved name
of the text downloaded with each image (`<key>.txt` in the tar), which has no caption shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.tables import write_parquet_atomic

ALT_TEXT = "alt"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("prompts", pa.list_(pa.string())),
        ("seed", pa.int64()),
        (
            "dropped",
            pa.list_(pa.struct([("text", pa.string()), ("score", pa.float32()), ("reason", pa.string())])),
        ),
        ("failure", pa.string()),
    ]
)


class CaptionShardError(ValueError):
    """A caption shard that cannot be read or does not belong to its image shard."""


@dataclass(frozen=True)
class CaptionRow:
    captions: tuple[str, ...]
    scores: tuple[float, ...] | None


@dataclass(frozen=True)
class DroppedCaption:
    text: str
    score: float | None
    reason: str


def write_caption_shard(path: Path, rows: list[dict]) -> None:
    """Rows with the SCHEMA's fields (`dropped` and `failure` may be left out), written under a temporary
    name and renamed."""
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), Path(path))


def read_caption_shard(path: Path, keys: list[str] | None = None) -> dict[str, CaptionRow]:
    """Captions and scores by key, in file order. With `keys` (the image tar's keys in order), the
    shard must hold exactly those keys in that order, else `CaptionShardError` names both counts."""
    try:
        table = pq.read_table(path, columns=["key", "captions", "scores"])
    except (OSError, pa.ArrowException) as err:
        raise CaptionShardError(f"{path}: unreadable caption shard ({str(err).splitlines()[0]})") from None
    _check_types(path, table.schema, ("key", "captions", "scores"))
    if table.column("key").null_count or table.column("captions").null_count:
        raise CaptionShardError(f"{path}: not a caption shard (a row without key or captions)")
    table = table.to_pydict()
    if keys is not None and table["key"] != list(keys):
        raise CaptionShardError(
            f"{path}: its keys do not match the image shard's "
            f"({len(table['key'])} vs {len(keys)} keys); rerun the caption stage"
        )
    return {
        key: CaptionRow(tuple(captions), tuple(scores) if scores is not None else None)
        for key, captions, scores in zip(table["key"], table["captions"], table["scores"])
    }


def _check_types(path: Path, schema: pa.Schema, names) -> None:
    """The columns `names` have the types of SCHEMA, else `CaptionShardError` naming the column."""
    for name in names:
        if not schema.field(name).type.equals(SCHEMA.field(name).type):
            raise CaptionShardError(
                f"{path}: not a caption shard (column {name!r} is {schema.field(name).type}, "
                f"not {SCHEMA.field(name).type})"
            )


def read_dropped(path: Path) -> dict[str, tuple[DroppedCaption, ...]]:
    """The dropped captions by key; empty tuples for a shard without the `dropped` column."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise CaptionShardError(f"{path}: unreadable caption shard ({str(err).splitlines()[0]})") from None
    _check_types(path, table.schema, [n for n in ("key", "dropped") if n in table.column_names])
    keys = table.column("key").to_pylist()
    if "dropped" not in table.column_names:
        return {key: () for key in keys}
    return {
        key: tuple(DroppedCaption(d["text"], d["score"], d["reason"]) for d in (dropped or ()))
        for key, dropped in zip(keys, table.column("dropped").to_pylist())
    }


def read_rows(path: Path) -> list[dict]:
    """Every row of a caption shard with all its columns (`failure` None where the column is absent)."""
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise CaptionShardError(f"{path}: unreadable caption shard ({str(err).splitlines()[0]})") from None
    return [{"dropped": None, "failure": None, **row} for row in rows]
