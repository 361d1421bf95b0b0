"""The caption bank for the retrieval backend: read, exact-string deduplicate, embed once, cache.

Cache: `<root>/caption_bank/<fingerprint>/<chunk>.npy` (+ `_done/` markers), one chunk per
`CHUNK_ROWS` captions, so a large bank's embedding resumes after an interruption. The fingerprint
covers the bank's content and the CLIP model, so a changed bank or model gets a fresh cache.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards import markers
from shards.atomic import atomic_write
from shards.naming import rank_split, shard_name
from shards.tables import TableError, read_table
from stages.base import fingerprint_of
from stages.errors import StageConfigError

log = logging.getLogger(__name__)
CHUNK_ROWS = 100_000


def read_bank(path: Path, column: str) -> list[str]:
    """Captions of a text file (one per line), parquet or jsonl table; exact duplicates and empty lines
    dropped."""
    if not Path(path).is_file():
        raise StageConfigError(f"caption bank not found: {path}")
    if Path(path).suffix.lower() in (".txt", ".text"):
        texts = Path(path).read_text(encoding="utf-8").splitlines()
    else:
        try:
            texts = read_table(path, columns=[column])[column].to_pylist()
        except TableError as err:
            raise StageConfigError(str(err)) from err
    unique = list(dict.fromkeys(t for t in texts if t and t.strip()))
    if not unique:
        raise StageConfigError(f"caption bank is empty: {path}")
    return unique


def bank_fingerprint(identity: dict) -> str:
    """The cache folder's name: the bank's content and the CLIP model that embeds it (the caption
    stage's `model_identity`; a scoring model does not change the bank's embeddings)."""
    model = {k: identity.get(k) for k in ("model", "pretrained", "pretrained_sha256")}
    return fingerprint_of({"bank_sha256": identity["bank_sha256"], "model": model, "version": 2})


def bank_embeddings(
    texts: list[str], clip, cache_dir: Path, batch_size: int, rank: int, world_size: int, show_progress: bool
) -> np.ndarray:
    """Embeddings of `texts` in order, computing only the chunks not cached yet.

    Each rank embeds its share of the chunks first, then any chunk still missing (so ranks that
    run at different times never wait on each other; ranks running together rarely overlap).
    """
    chunks = [shard_name(i) for i in range(math.ceil(len(texts) / CHUNK_ROWS))]
    ordered = rank_split(chunks, rank, world_size) + [
        c for c in chunks if c not in rank_split(chunks, rank, world_size)
    ]
    todo = [c for c in ordered if markers.read_marker(cache_dir, c) is None]
    if todo:
        log.info(
            "caption bank: embedding %d captions (%d of %d chunks) into %s",
            len(texts),
            len(todo),
            len(chunks),
            cache_dir,
        )
    for chunk in tqdm(todo, desc="caption bank", unit="chunk", disable=not show_progress or len(todo) < 2):
        if markers.read_marker(cache_dir, chunk) is not None:  # another rank finished it meanwhile
            continue
        start = int(chunk) * CHUNK_ROWS
        vectors = clip.encode_texts(texts[start : start + CHUNK_ROWS], batch_size, progress=show_progress)
        with atomic_write(cache_dir / f"{chunk}.npy") as handle:
            np.save(handle, vectors.astype(np.float32))
        markers.write_marker(cache_dir, chunk, {"rows": len(vectors)})
    return np.concatenate([np.load(cache_dir / f"{c}.npy") for c in chunks])
