"""The search index of one model over the index stage's fp16 shard vectors, and its card.

Kind (`kind: auto`): up to `exact_max_rows` images the exact blocked search of the caption bank
(captioning/bank_search.py: the shard files are its fp16 chunks, nothing else is written); above it,
as autofaiss does, the best index that fits `memory_mib`: HNSW (fp32 vectors plus a graph of M
links per vector) when it fits, else IVF-PQ with the longest PQ code that fits (nlist ~ 4 sqrt(n)).
The search parameter (nprobe, efSearch) is the smallest that reaches `target_recall` of recall@k
against the exact search on `recall_sample` held-out images (not in the IVF training sample);
candidates are scored again exactly from the fp16 vectors (bank_search.rescore), as the bank does.

Writes `<model>/index.json` (the card: kind, parameters, rows, memory, recall@k and its curve,
the shards and their tars) and `<model>/ivfpq.faiss` or `hnsw.faiss`, plus `<model>/texts/` with
`texts: true` (the caption set's distinct captions as a caption bank: texts.arrow + fp16 chunks).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from captioning.bank_search import BankVectors, ExactSearch, recall_at_k, write_texts
from shards import marker_view
from shards.atomic import atomic_write, remove_orphans, tmp_path_for, write_json_atomic
from stages.base import read_markers
from stages.errors import ShardError
from stages.index.embed import meta_path, vectors_path

log = logging.getLogger(__name__)

CARD = "index.json"
HNSW_M = 32
TEXT_CHUNK_ROWS = 100_000
POLL_SECONDS = 1.0


def card_path(folder: Path, model: str) -> Path:
    return Path(folder) / model / CARD


def wait_for_shards(plan, shards: list[str], wait_seconds: float, ctx) -> None:
    """Until every shard unit has a marker with this fingerprint; an error naming the missing ones
    (and the rank that owns them) when none appeared for `wait_seconds`."""
    last_change, seen = time.monotonic(), -1
    while True:
        found = read_markers(plan.stage_dir, shards, plan.root)  # through the summary: a stat each
        done = set(marker_view.with_fingerprint(found, plan.fingerprint))
        if len(done) == len(shards):
            return
        if len(done) != seen:
            seen, last_change = len(done), time.monotonic()
        if time.monotonic() - last_change > wait_seconds:
            missing = [u for u in shards if u not in done]
            owners = ", ".join(f"{u} (rank {shards.index(u) % ctx.world_size})" for u in missing[:3])
            raise ShardError(
                f"index: no new shard for {wait_seconds:g} s; still missing {len(missing)}: {owners}; "
                "rerun those ranks (wait_seconds sets the limit)"
            )
        time.sleep(POLL_SECONDS)


def collection(folder: Path, model: str, shards: list[str]) -> tuple[BankVectors, list[str]]:
    """The model's vectors of every shard with rows, as one bank (row ids in shard order)."""
    paths, used = [], []
    for unit in shards:
        path = vectors_path(folder, model, unit)
        if np.load(path, mmap_mode="r").shape[0]:
            paths.append(path)
            used.append(unit)
    if not paths:
        raise ShardError(f"index: {folder}: no decodable picture in any shard; nothing to index")
    return BankVectors(paths), used


def hnsw_bytes(rows: int, dim: int, m: int = HNSW_M) -> int:
    return rows * (dim * 4 + m * 2 * 4 + 16)


def ivfpq_bytes(rows: int, dim: int, nlist: int, pq_m: int) -> int:
    return rows * (pq_m + 8) + nlist * dim * 4 + 256 * dim * 4


def choose(cfg, rows: int, dim: int) -> dict:
    """The index kind and its build parameters for `rows` vectors of `dim` within `memory_mib`."""
    budget = int(cfg.memory_mib * 2**20)
    kind = cfg.kind
    if kind == "auto":
        kind = (
            "exact" if rows <= cfg.exact_max_rows else "hnsw" if hnsw_bytes(rows, dim) <= budget else "ivfpq"
        )
    if kind == "exact":
        return {"kind": "exact", "memory_bytes": 0}
    if kind == "hnsw":
        return {"kind": "hnsw", "M": HNSW_M, "efConstruction": 80, "memory_bytes": hnsw_bytes(rows, dim)}
    nlist = max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows)))), rows // 39 or 1))
    # 4+ dimensions per code byte: 2-d sub-quantizers (dim/2) train several times slower
    codes = [m for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0] or [1]
    fitting = [m for m in codes if ivfpq_bytes(rows, dim, nlist, m) <= budget]
    pq_m = fitting[0] if fitting else codes[-1]
    nbits = 8 if rows >= 256 * 39 else max(1, min(8, int(math.log2(max(2, rows // 39)))))
    return {
        "kind": "ivfpq",
        "nlist": nlist,
        "pq_m": pq_m,
        "nbits": nbits,
        "memory_bytes": ivfpq_bytes(rows, dim, nlist, pq_m),
        "fits_budget": bool(fitting),
    }


def train_ids(rows: int, params: dict, seed: int, held_out: int) -> np.ndarray:
    """The IVF training sample (sorted ids), leaving at least `held_out` rows (at most half) out for
    measuring recall; HNSW and exact train on nothing."""
    if params["kind"] != "ivfpq":
        return np.zeros(0, np.int64)
    want = min(rows - min(held_out, rows // 2), max(40 * params["nlist"], 10_000))  # faiss: >= 39 a list
    return np.sort(np.random.default_rng(seed).choice(rows, size=want, replace=False))


def build_faiss(bank: BankVectors, params: dict, train: np.ndarray, seed: int):
    import faiss

    if params["kind"] == "hnsw":
        index = faiss.IndexHNSWFlat(bank.dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
    else:
        quantizer = faiss.IndexFlatIP(bank.dim)
        index = faiss.IndexIVFPQ(
            quantizer, bank.dim, params["nlist"], params["pq_m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.pq.cp.niter = 10  # faiss's default 25 triples the build for a recall the tuning recovers
        index.train(bank.gather(train).astype(np.float32))
    for _first, view, chunk, row in bank.blocks(1 << 16):
        index.add(np.ascontiguousarray(view, dtype=np.float32))
        chunk.release(row, row + len(view))
    return index


def held_out(rows: int, train: np.ndarray, count: int, seed: int) -> np.ndarray:
    free = np.setdiff1d(np.arange(rows), train, assume_unique=True)
    if len(free) == 0:
        free = np.arange(rows)
    return np.sort(np.random.default_rng([seed, 1]).choice(free, size=min(count, len(free)), replace=False))


def tune(index, bank: BankVectors, params: dict, query_sets: dict, k: int, target: float):
    """(chosen search parameter, [{parameter, recall per query set}]): doubling from its cheapest
    value until every query set (name -> (queries, exact ids)) reaches `target`."""
    from stages.index.search import CANDIDATES, approximate_search

    name = "nprobe" if params["kind"] == "ivfpq" else "efSearch"
    limit = params["nlist"] if name == "nprobe" else 4096
    value, curve = 1 if name == "nprobe" else CANDIDATES * k + 8, []  # efSearch >= the candidates asked for
    while True:
        point = {name: value}
        for label, (queries, exact) in query_sets.items():
            _, ids = approximate_search(index, bank, queries, k, {name: value})
            point[label] = recall_at_k(ids, exact)
        curve.append(point)
        if all(point[label] >= target for label in query_sets) or value >= limit:
            return value, curve
        value = min(limit, value * 2)


def _query_sets(cfg, bank: BankVectors, sample: np.ndarray, texts: dict | None, k: int, seed: int) -> dict:
    """Held-out pictures as queries, and (with `texts: true`) a sample of the caption set's texts:
    text queries lie elsewhere than pictures (CLIP's modality gap), so IVF lists are tuned for both."""
    search = ExactSearch(bank, cfg.device, cfg.search_memory_mib)
    queries = bank.gather(sample).astype(np.float32)
    sets = {"recall": (queries, search.search(queries, k)[1])}
    if texts and texts["rows"]:
        vectors = BankVectors(texts["files"][1:])
        pick = np.sort(
            np.random.default_rng([seed, 2]).choice(
                vectors.rows, min(cfg.recall_sample, vectors.rows), replace=False
            )
        )
        text_queries = vectors.gather(pick).astype(np.float32)
        sets["recall_texts"] = (text_queries, search.search(text_queries, k)[1])
    return sets


def build_model_index(cfg, ctx, plan, entry, tars: dict[str, Path]) -> None:
    """Build, measure and write the card of `entry`'s index, then its unit's marker."""
    import faiss

    from stages.index import build_unit

    folder, model = plan.stage_dir, entry.name
    remove_orphans(folder / model)
    started = time.monotonic()
    bank, used = collection(folder, model, list(tars))
    seed = plan.settings["seed"]
    params = choose(cfg, bank.rows, bank.dim)
    train = train_ids(bank.rows, params, seed, cfg.recall_sample)
    sample = held_out(bank.rows, train, cfg.recall_sample, seed)
    k = min(cfg.recall_k, bank.rows)
    texts = _texts(cfg, ctx, folder, entry, list(tars)) if cfg.texts else None
    outputs, card = [], {"recall_at_k": 1.0, "recall_curve": []}
    if params["kind"] != "exact":
        index = build_faiss(bank, params, train, seed)
        query_sets = _query_sets(cfg, bank, sample, texts, k, seed)
        value, curve = tune(index, bank, params, query_sets, k, cfg.target_recall)
        params["nprobe" if params["kind"] == "ivfpq" else "efSearch"] = value
        card = {"recall_at_k": curve[-1]["recall"], "recall_curve": curve}
        if "recall_texts" in curve[-1]:
            card["recall_at_k_texts"] = curve[-1]["recall_texts"]
        index_file = folder / model / f"{params['kind']}.faiss"
        tmp = tmp_path_for(index_file)
        faiss.write_index(index, str(tmp))
        tmp.replace(index_file)
        outputs.append(index_file)
    outputs += texts.pop("files") if texts else []
    card = {
        "index": model,
        "stage": cfg.name,
        **params,
        **card,
        "rows": bank.rows,
        "dim": bank.dim,
        "k": k,
        "recall_sample": len(sample),
        "target_recall": cfg.target_recall,
        "model": {"architecture": cfg.model, "entry": entry.model_dump(mode="json")},
        "shards": [
            {"unit": u, "rows": int(bank.offsets[i + 1] - bank.offsets[i])} for i, u in enumerate(used)
        ],
        "tars": {u: str(tars[u]) for u in tars},
        "texts": texts,
        "build_seconds": round(time.monotonic() - started, 3),
    }
    write_json_atomic(card_path(folder, model), card)
    log.info(
        "index %s: %s over %d x %d, recall@%d %.3f on %d held-out images",
        model, params["kind"], bank.rows, bank.dim, k, card["recall_at_k"], len(sample),
    )  # fmt: skip
    plan.mark_done(build_unit(model), {"card": card}, outputs=[card_path(folder, model), *outputs])


def _texts(cfg, ctx, folder: Path, entry, shards: list[str]) -> dict:
    """The caption set's distinct captions embedded by the model's text tower, as a caption bank."""
    from stages.index.embed import load_models

    texts: dict[str, None] = {}
    for unit in shards:
        for captions in pq.read_table(meta_path(folder, unit), columns=["captions"]).column(0).to_pylist():
            texts.update(dict.fromkeys(t for t in captions or [] if t and t.strip()))
    ordered = list(texts)
    out = folder / entry.name / "texts"
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    texts_file = out / "texts.arrow"
    tmp = tmp_path_for(texts_file)
    write_texts(tmp, ordered)
    tmp.replace(texts_file)
    files = [texts_file]
    if ordered:
        clip = load_models(cfg.model_copy(update={"models": [entry]}), ctx.root)[entry.name]
        for c, start in enumerate(range(0, len(ordered), TEXT_CHUNK_ROWS)):
            vectors = clip.encode_texts(ordered[start : start + TEXT_CHUNK_ROWS]).astype(np.float16)
            path = out / f"{c:06d}.npy"
            with atomic_write(path) as handle:
                np.save(handle, vectors)
            files.append(path)
    return {"rows": len(ordered), "chunks": len(files) - 1, "files": files}
