"""Searching a built index: text, picture or key queries against one model's image vectors.

    index = SearchIndex.open(root, cfg, "mcip")        # cfg: the manifest's IndexConfig
    index.by_text("a red circle", k=10)                  # [Hit(key, score, url, caption, alt), ...]
    index.by_image(jpeg_bytes, k=10); index.by_key("000000042", k=10); index.picture("000000042")

Reads the card (`<model>/index.json`, which must be the current one: its unit's marker carries the
stage's fingerprint), the shards' metadata parquet (into memory: key, url, alt, caption, offset),
the fp16 vectors (memory-mapped) and the faiss file for approximate kinds. Pictures are read from
the tars the card names, at the offsets of their key: no path ever comes from a caller.

Safe for concurrent queries from several threads: the model runs one batch at a time (a lock), the
searches share nothing mutable (faiss searches are thread-safe; search parameters are fixed at
load). Uploaded pictures are checked from their header before decoding (stages/download/guards.py).
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from captioning.bank_search import BankTexts, BankVectors, ExactSearch, rescore
from shards import markers
from stages.errors import InputNotReady, StageConfigError
from stages.evaluate.datasets import ImageRef
from stages.index.build import CARD, card_path, collection
from stages.index.embed import meta_path

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:+-]{1,200}$")
CANDIDATES = 10  # approximate kinds: candidates per result, scored again exactly


class QueryError(ValueError):
    """A query that cannot be answered (unknown key, bad picture, empty text): a 4xx, one line."""


@dataclass(frozen=True)
class Hit:
    key: str
    score: float
    url: str
    caption: str | None
    alt: str

    def to_dict(self) -> dict:
        return asdict(self)


def approximate_search(index, bank: BankVectors, queries: np.ndarray, k: int, params: dict):
    """Candidates from the faiss index (CANDIDATES x k + 8 of them), scored again exactly from the
    fp16 vectors: PQ codes rank near neighbours coarsely, the exact rescoring puts them in order."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    found = min(bank.rows, CANDIDATES * k + 8)
    if "nprobe" in params:
        search = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
    else:
        search = faiss.SearchParametersHNSW(efSearch=max(int(params["efSearch"]), found))
    _, ids = index.search(queries, found, params=search)
    return rescore(bank, queries, ids, k)


class SearchIndex:
    """One model's index, opened once and queried by many threads."""

    def __init__(self, root: Path, cfg, name: str, card: dict, device: str = "cpu") -> None:
        self.root, self.cfg, self.name, self.card, self.device = Path(root), cfg, name, card, device
        folder = Path(root) / "index" / cfg.name
        self.bank, _ = collection(folder, name, [s["unit"] for s in card["shards"]])
        self.meta = pa.concat_tables(
            [
                pq.read_table(
                    meta_path(folder, s["unit"]),
                    columns=["key", "url", "alt", "caption", "shard", "offset", "size"],
                )
                for s in card["shards"]
            ]
        )
        keys = np.array(self.meta.column("key").to_pylist())
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]
        self._columns = {
            c: self.meta.column(c).to_pylist() for c in ("key", "url", "alt", "caption", "shard")
        }
        self._offsets = self.meta.column("offset").to_numpy()
        self._sizes = self.meta.column("size").to_numpy()
        self._tars = {unit: Path(path) for unit, path in card["tars"].items()}
        self._search = self._searcher(folder)
        self._texts = self._text_bank(folder)
        self._model = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, cfg, name: str, device: str = "cpu") -> "SearchIndex":
        """The index of model `name`; `InputNotReady` when it is not built with the current settings."""
        from stages.index import build_unit, describe

        names = [m.name for m in cfg.models]
        if name not in names:
            raise StageConfigError(
                f"index {name!r} is not a model of stages.index (models: {', '.join(names)})"
            )
        folder, _, settings = describe(cfg, root)
        from stages.base import fingerprint_of

        marker = markers.read_marker(folder, build_unit(name))
        if marker is None or marker.get("fingerprint") != fingerprint_of(settings):
            raise InputNotReady(
                f"index {name!r} is not built in {folder} with the current settings; run the index stage"
            )
        return cls(root, cfg, name, marker["card"], device)

    def _searcher(self, folder: Path):
        if self.card["kind"] == "exact":
            exact = ExactSearch(self.bank, self.device, self.cfg.search_memory_mib)
            return exact.search
        import faiss

        index = faiss.read_index(str(folder / self.name / f"{self.card['kind']}.faiss"))
        params = {k: self.card[k] for k in ("nprobe", "efSearch") if k in self.card}
        return lambda queries, k: approximate_search(index, self.bank, queries, k, params)

    def _text_bank(self, folder: Path):
        texts = self.card.get("texts")
        if not texts or not texts["rows"]:
            return None
        out = folder / self.name / "texts"
        vectors = BankVectors([out / f"{c:06d}.npy" for c in range(texts["chunks"])])
        return BankTexts(out / "texts.arrow", texts["rows"]), ExactSearch(
            vectors, self.device, self.cfg.search_memory_mib
        )

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from stages.index.embed import load_models

                entry = next(m for m in self.cfg.models if m.name == self.name)
                cfg = self.cfg.model_copy(update={"models": [entry], "device": self.device})
                self._model = load_models(cfg, self.root)[self.name]
            return self._model

    # queries --------------------------------------------------------------------------------------

    def by_text(self, text: str, k: int) -> list[Hit]:
        if not text or not text.strip():
            raise QueryError("empty text query")
        clip = self.model
        with self._lock:
            query = clip.encode_texts([text])
        return self._hits(query, k)

    def by_image(self, data: bytes, k: int, max_pixels: float) -> list[Hit]:
        return self._hits(self.embed_picture(data, max_pixels), k)

    def by_key(self, key: str, k: int) -> list[Hit]:
        return self._hits(self.stored_vector(key), k)

    def stored_vector(self, key: str) -> np.ndarray:
        """The key's picture as indexed (fp16 on disk), normalised again: its own score is 1."""
        vector = self.bank.gather(np.array([self.row_of(key)]))
        return (vector / max(np.linalg.norm(vector), 1e-12)).astype(np.float32)

    def texts_for_image(self, data: bytes | None, key: str | None, k: int, max_pixels: float) -> list[dict]:
        """Image -> text: the caption set's best captions for a picture or a key (`texts: true`)."""
        if self._texts is None:
            raise QueryError(f"index {self.name!r} has no text embeddings (set texts: true)")
        query = self.embed_picture(data, max_pixels) if data is not None else self.stored_vector(key)
        texts, search = self._texts
        scores, ids = search.search(np.asarray(query, np.float32), k)
        keep = ids[0] >= 0
        return [{"text": t, "score": float(s)} for t, s in zip(texts.take(ids[0][keep]), scores[0][keep])]

    def embed_picture(self, data: bytes, max_pixels: float) -> np.ndarray:
        from PIL import Image

        from stages.download.guards import header_refusal

        refusal = header_refusal(data, max_pixels)
        if refusal:
            raise QueryError(refusal)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as err:
            raise QueryError(f"cannot decode the picture ({err})") from None
        clip = self.model
        with self._lock:
            return clip.encode_images(clip.preprocess(image).unsqueeze(0)).numpy()

    def row_of(self, key: str) -> int:
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise QueryError("a key is 1-200 letters, digits or _.:+-")
        at = int(np.searchsorted(self._sorted_keys, key))
        if at >= len(self._sorted_keys) or self._sorted_keys[at] != key:
            raise QueryError(f"no picture with key {key!r} in index {self.name!r}")
        return int(self._order[at])

    def picture(self, key: str) -> bytes:
        """The picture's bytes from its tar, at the offset the metadata recorded for the key."""
        row = self.row_of(key)
        tar = self._tars[self._columns["shard"][row]]
        return ImageRef(tar, int(self._offsets[row]), int(self._sizes[row])).read()

    def _hits(self, query: np.ndarray, k: int) -> list[Hit]:
        scores, ids = self._search(np.asarray(query, np.float32).reshape(1, -1), min(k, self.bank.rows))
        c = self._columns
        return [
            Hit(c["key"][i], round(float(s), 6), c["url"][i], c["caption"][i], c["alt"][i])
            for s, i in zip(scores[0].tolist(), ids[0].tolist())
            if i >= 0
        ]


def open_indexes(manifest, names: list[str], device: str = "cpu") -> dict[str, SearchIndex]:
    cfg = manifest.stages.index
    if cfg is None:
        raise StageConfigError("the manifest has no stages.index section")
    return {name: SearchIndex.open(manifest.run.root, cfg, name, device) for name in names}


__all__ = ["CARD", "Hit", "QueryError", "SearchIndex", "approximate_search", "card_path", "open_indexes"]
