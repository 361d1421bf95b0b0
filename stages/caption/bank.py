"""The caption bank for the retrieval backend: read, exact-string deduplicate, embed once per run, cache.

Cache `<root>/caption_bank/<fingerprint>/` (the fingerprint covers the bank's content and the CLIP
model, so a changed bank or model gets a fresh cache):

    texts.arrow           the deduplicated captions, row i = bank id i (Arrow IPC, memory-mapped)
    000000.npy ...        fp16 embeddings, CHUNK_ROWS rows per chunk (memory-mapped by every rank)
    ivfpq-<params>.faiss  the approximate index, when `index: ivfpq`
    _done/<unit>.json     one marker per unit above, written last

Units are split over the ranks: rank 0 writes the texts and the index, chunk i belongs to rank
i % world_size. A rank that needs a unit another rank owns waits for its marker; when no new marker
has appeared for `bank_wait_seconds` it stops with an error naming the unit and its owner. A unit
whose marker is missing is redone by its owner (an interrupted run resumes; orphans are removed).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from captioning.bank_search import (
    TEXTS_FILE,
    ApproximateSearch,
    BankFormatError,
    BankTexts,
    BankVectors,
    build_ivfpq,
    ivfpq_params,
    write_texts,
)
from shards import markers
from shards.atomic import atomic_write, remove_orphans, tmp_path_for
from shards.marker_schema import CacheMarker
from shards.naming import shard_name
from shards.tables import TableError, read_table
from stages.base import fingerprint_of
from stages.errors import ShardError, StageConfigError

log = logging.getLogger(__name__)
CHUNK_ROWS = 100_000
TEXTS_UNIT = "texts"
POLL_SECONDS = 0.5
MAX_CAPTION_CHARS = 10_000  # per caption of the bank file (see read_bank)


def read_bank(path: Path, column: str) -> list[str]:
    """Captions of a text file (one per line), parquet or jsonl table; exact duplicates and empty lines
    dropped.

    A caption longer than MAX_CAPTION_CHARS is an error naming the file and the line (or row), not a
    skipped line: CLIP reads 77 tokens, so such a "caption" means a wrong file or column (a file
    without newlines, a column of documents), which skipping would hide. A text file is read line by
    line with that bound, so one endless line cannot fill the memory.
    """
    if not Path(path).is_file():
        raise StageConfigError(f"caption bank not found: {path}")
    if Path(path).suffix.lower() in (".txt", ".text"):
        try:
            texts = _read_lines(Path(path))
        except UnicodeDecodeError as err:
            raise StageConfigError(
                f"caption bank {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                f"{err.start} of a read block); save it as UTF-8"
            ) from None
    else:
        try:
            captions = read_table(path, columns=[column])[column]
        except TableError as err:
            raise StageConfigError(str(err)) from err
        _check_lengths(path, column, captions)
        texts = captions.to_pylist()
    unique = list(dict.fromkeys(t for t in texts if t and t.strip()))
    if not unique:
        raise StageConfigError(f"caption bank is empty: {path}")
    return unique


def _too_long(path: Path, where: str) -> StageConfigError:
    return StageConfigError(
        f"caption bank {path}: {where} is longer than {MAX_CAPTION_CHARS} characters (one caption per "
        "line or row is expected); fix the file or choose the caption column with bank_col"
    )


def _read_lines(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:  # universal newlines: \n, \r\n and \r end a line
        for number, line in enumerate(iter(lambda: handle.readline(MAX_CAPTION_CHARS + 1), ""), 1):
            text = line[:-1] if line.endswith("\n") else line
            if len(text) > MAX_CAPTION_CHARS:
                raise _too_long(path, f"line {number}")
            texts.extend(text.splitlines())  # the other separators str.splitlines knows, as before
    return texts


def _check_lengths(path: Path, column: str, captions) -> None:
    if not (pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type)):
        raise StageConfigError(
            f"caption bank {path}: column {column!r} holds {captions.type}, not text; "
            "choose the caption column with bank_col"
        )
    too_long = pc.greater(pc.utf8_length(captions), MAX_CAPTION_CHARS)
    if pc.any(too_long).as_py():
        raise _too_long(path, f"the caption in row {pc.index(too_long, True).as_py()} of column {column!r}")


def bank_fingerprint(identity: dict) -> str:
    """The cache folder's name: the bank's content and the CLIP model that embeds it (the caption
    stage's `model_identity`; a scoring model does not change the bank's embeddings)."""
    model = {k: identity.get(k) for k in ("model", "pretrained", "pretrained_sha256")}
    return fingerprint_of({"bank_sha256": identity["bank_sha256"], "model": model, "version": 3})


class Bank:
    """An opened bank: texts by id, fp16 vectors, the folder (for the cached index)."""

    def __init__(self, folder: Path, texts: BankTexts, vectors: BankVectors, embedded=()) -> None:
        self.folder, self.texts, self.vectors = folder, texts, vectors
        self.embedded = list(embedded)  # the chunks this rank embedded in this call

    def __len__(self) -> int:
        return len(self.texts)


def _read_marker(cache_dir: Path, unit: str) -> dict | None:
    """A cache unit's marker; a damaged one is a `ShardError` naming its file."""
    try:
        return markers.read_marker(cache_dir, unit, CacheMarker)
    except markers.MarkerError as err:
        raise ShardError(f"caption bank: {err}") from None


def _wait_for(cache_dir: Path, unit: str, owner: int, timeout: float, watched: list[str]) -> dict:
    """The marker of `unit`, waiting while other units of the bank keep finishing."""
    last_progress, seen = time.monotonic(), None
    while True:
        marker = _read_marker(cache_dir, unit)
        if marker is not None:
            return marker
        done = sum(markers.marker_path(cache_dir, u).exists() for u in watched)
        if done != seen:
            last_progress, seen = time.monotonic(), done
        if time.monotonic() - last_progress > timeout:
            raise ShardError(
                f"caption bank {cache_dir}: unit {unit!r} (owned by rank {owner}) not done after "
                f"waiting {timeout:.0f} s without progress; is rank {owner} running? (bank_wait_seconds)"
            )
        time.sleep(POLL_SECONDS)


def _write_texts(section, cache_dir: Path) -> None:
    texts = read_bank(section.bank, section.bank_col)
    tmp = tmp_path_for(cache_dir / TEXTS_FILE)
    try:
        write_texts(tmp, texts)
        tmp.replace(cache_dir / TEXTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    markers.write_marker(cache_dir, TEXTS_UNIT, {"rows": len(texts)})


def _damaged(cache_dir: Path, chunk: str) -> bool:
    """Whether a finished chunk's file no longer matches its marker (cut, deleted, rewritten): a
    damaged cache is embedded again by its owner, with a warning naming it."""
    marker = _read_marker(cache_dir, chunk)
    try:
        BankVectors([cache_dir / f"{chunk}.npy"], [(marker["rows"], marker.get("dim"))])
    except BankFormatError as err:
        log.warning("caption bank: %s; embedding chunk %s again", err, chunk)
        markers.remove_marker(cache_dir, chunk)
        return True
    return False


def embed_chunk(texts: BankTexts, clip, cache_dir: Path, chunk: str, rows: int, batch_size: int, rank: int):
    start = int(chunk) * rows
    vectors = clip.encode_texts(texts.slice(start, min(start + rows, len(texts))), batch_size)
    with atomic_write(cache_dir / f"{chunk}.npy") as handle:
        np.save(handle, vectors.astype(np.float16))
    markers.write_marker(
        cache_dir,
        chunk,
        {"rows": len(vectors), "dim": int(vectors.shape[1]), "dtype": "float16", "rank": rank},
    )


def prepare_bank(
    section,
    clip,
    cache_dir: Path,
    rank: int,
    world_size: int,
    show_progress: bool,
    chunk_rows: int = CHUNK_ROWS,
) -> Bank:
    """The bank's texts and embeddings, computing this rank's missing units and waiting for the
    others'. `section` is the stage's RetrievalSection (bank, bank_col, bank_batch_size,
    bank_wait_seconds)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    timeout = float(section.bank_wait_seconds)
    if rank == 0:
        remove_orphans(cache_dir, TEXTS_FILE)
        if _read_marker(cache_dir, TEXTS_UNIT) is None:
            _write_texts(section, cache_dir)
    texts_marker = _wait_for(cache_dir, TEXTS_UNIT, 0, timeout, [TEXTS_UNIT])
    try:
        texts = BankTexts(cache_dir / TEXTS_FILE, texts_marker["rows"])
    except BankFormatError as err:
        raise ShardError(f"caption bank: {err}; delete {markers.marker_path(cache_dir, TEXTS_UNIT)}") from err
    chunks = [shard_name(i) for i in range(math.ceil(len(texts) / chunk_rows))]
    mine = [c for i, c in enumerate(chunks) if i % world_size == rank]
    for chunk in mine:
        remove_orphans(cache_dir, chunk)
        remove_orphans(cache_dir / markers.DONE_DIR, chunk)
    todo = [c for c in mine if _read_marker(cache_dir, c) is None or _damaged(cache_dir, c)]
    if todo:
        log.info(
            "caption bank: rank %d embeds %d of %d chunks (%d captions in all) into %s",
            rank,
            len(todo),
            len(chunks),
            len(texts),
            cache_dir,
        )
    for chunk in tqdm(todo, desc="caption bank", unit="chunk", disable=not show_progress or len(todo) < 2):
        embed_chunk(texts, clip, cache_dir, chunk, chunk_rows, section.bank_batch_size, rank)
    found = [_wait_for(cache_dir, c, int(c) % world_size, timeout, chunks) for c in chunks]
    try:
        vectors = BankVectors(
            [cache_dir / f"{c}.npy" for c in chunks], [(m["rows"], m.get("dim")) for m in found]
        )
    except BankFormatError as err:
        raise ShardError(f"caption bank: {err}; delete its marker to embed it again") from err
    return Bank(cache_dir, texts, vectors, todo)


def index_unit(section, bank: Bank) -> str:
    nlist, pq_m = ivfpq_params(len(bank), bank.vectors.dim, section.ivf_nlist, section.pq_m)
    return f"ivfpq-{nlist}-{pq_m}"


def prepare_index(section, bank: Bank, rank: int, seed: int = 0) -> ApproximateSearch:
    """The cached IVF-PQ index beside the bank: rank 0 builds it (to a temporary name, renamed, then
    its marker), the other ranks wait for the marker."""
    try:
        unit = index_unit(section, bank)
    except ValueError as err:
        raise StageConfigError(f"caption.retrieval: {err}") from err
    path = bank.folder / f"{unit}.faiss"
    if rank == 0 and _read_marker(bank.folder, unit) is None:
        remove_orphans(bank.folder, unit)
        tmp = tmp_path_for(path)
        start = time.monotonic()
        log.info("caption bank: building %s for %d captions", unit, len(bank))
        try:
            build_ivfpq(bank.vectors, tmp, section.ivf_nlist, section.pq_m, seed)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        markers.write_marker(bank.folder, unit, {"rows": len(bank), "seconds": time.monotonic() - start})
    _wait_for(bank.folder, unit, 0, float(section.bank_wait_seconds), [unit])
    try:
        return ApproximateSearch(bank.vectors, path, section.ivf_nprobe)
    except BankFormatError as err:
        raise ShardError(f"caption bank: {err}; delete {markers.marker_path(bank.folder, unit)}") from err
