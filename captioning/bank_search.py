"""The caption bank on disk and its search in bounded memory.

The bank is a folder of fp16 chunk files (`<chunk>.npy`, rows in bank-id order) and `texts.arrow`
(an Arrow IPC file, one string column `text`, row i is bank id i). Both are memory-mapped: all ranks
of a node share one copy through the page cache, and no rank builds a list of every caption.

Exact search streams the bank through the device in blocks and keeps a running top-k. CPU: each
bank block is converted fp16 -> fp32 into one staging buffer and searched by faiss's exhaustive
inner-product kernel (BLAS sgemm in tiles plus heaps, as faiss's flat index, but never the whole bank
in float32); GPU: a matmul in fp16 with fp32 accumulation and torch's top-k. Block sizes come from a
memory budget (`plan_blocks`), and the pages of a bank block are dropped from the process (madvise
DONTNEED; they stay in the page cache) once the block is used, so memory per rank does not grow with
the bank. The `k + RESCORE_MARGIN` best candidates of every image are then scored
again one image at a time in float64 (from the fp16 bank), and sorted by (cosine desc, bank id asc):
an image's captions do not depend on which other images share its batch, nor on the device.

Tolerance: bank vectors are stored in fp16 (relative rounding <= 2**-11 per component), so a
cosine differs from the fp32 one by at most `FP16_COSINE_TOLERANCE` (||q|| ||b - fp16(b)|| for unit
vectors; typically ~1e-5). Results equal an exact fp32 search except where two cosines are within
twice that of each other (or of the threshold).

Approximate search (`ivfpq`): a faiss IVF-PQ index trained on a sample of the bank, filled chunk by
chunk from the fp16 files; its candidates are scored again exactly like the exact search's.

This module imports nothing of the project but `captioning`; the caption stage owns markers and
ranks (stages/caption/bank.py).
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FP16_COSINE_TOLERANCE = 2.0**-11  # 4.9e-4: |cos_fp16 - cos_fp32| for unit vectors, worst case
RESCORE_MARGIN = 8  # candidates beyond k scored again per image
TEXTS_FILE = "texts.arrow"
TEXT_COLUMN = "text"
_PAGE = mmap.PAGESIZE


class BankFormatError(ValueError):
    """A bank file that is missing, damaged or does not match what its writer said."""


class _Chunk:
    """One fp16 `.npy` chunk, memory-mapped read-only; `release` drops its pages from this process."""

    def __init__(self, path: Path, rows: int | None = None, dim: int | None = None) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    version, np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(handle)
                offset = handle.tell()
                self._mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise BankFormatError(f"{self.path}: not a readable .npy chunk ({err})") from err
        if fortran or len(shape) != 2 or dtype != np.float16:
            raise BankFormatError(f"{self.path}: expected a C-order 2-d float16 array, got {dtype} {shape}")
        if (rows is not None and shape[0] != rows) or (dim is not None and shape[1] != dim):
            raise BankFormatError(f"{self.path}: shape {shape}, its marker says ({rows}, {dim})")
        self.offset, self._fd = offset, None
        needed = offset + shape[0] * shape[1] * 2
        if len(self._mm) < needed:
            raise BankFormatError(f"{self.path}: cut off ({len(self._mm)} bytes, its header needs {needed})")
        self.array = np.frombuffer(self._mm, np.float16, shape[0] * shape[1], offset).reshape(shape)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows by pread, not through the mapping: scattered reads would map whole page-cache folios
        (up to MiBs each) into the process."""
        row_bytes = self.array.shape[1] * 2
        out = np.empty((len(rows), self.array.shape[1]), np.float16)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        for j, row in enumerate(rows.tolist()):
            os.preadv(self._fd, [memoryview(out[j]).cast("B")], self.offset + row * row_bytes)
        return out

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the mapped pages of rows [start, stop) from this process (not from the page cache)."""
        stop = self.array.shape[0] if stop is None else stop
        row_bytes = self.array.shape[1] * 2
        first = (self.offset + start * row_bytes) // _PAGE * _PAGE
        last = self.offset + stop * row_bytes
        if hasattr(self._mm, "madvise") and last > first:
            self._mm.madvise(mmap.MADV_DONTNEED, first, min(last, len(self._mm)) - first)


class BankVectors:
    """The bank's embeddings: fp16 chunk files, memory-mapped, in bank-id order."""

    def __init__(self, paths: list[Path], shapes: list[tuple[int, int]] | None = None) -> None:
        if not paths:
            raise BankFormatError("caption bank has no chunks")
        shapes = shapes or [(None, None)] * len(paths)
        self.chunks = [_Chunk(p, *s) for p, s in zip(paths, shapes)]
        dims = {c.array.shape[1] for c in self.chunks}
        if len(dims) != 1:
            raise BankFormatError(f"caption bank chunks have different widths {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [c.array.shape[0] for c in self.chunks])
        self.rows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.rows

    def blocks(self, block_rows: int):
        """(first bank id, fp16 view, chunk, row in chunk) per block; blocks never straddle chunks."""
        for chunk, base in zip(self.chunks, self.offsets[:-1]):
            for start in range(0, chunk.array.shape[0], block_rows):
                view = chunk.array[start : start + block_rows]
                yield int(base) + start, view, chunk, start

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float64 rows for bank ids (any shape of int array); -1 gives zeros."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.dim), np.float64)
        valid = np.flatnonzero(flat >= 0)
        owner = np.searchsorted(self.offsets, flat[valid], side="right") - 1
        for c in np.unique(owner):
            pick = valid[owner == c]
            out[pick] = self.chunks[c].read_rows(flat[pick] - self.offsets[c])
        return out.reshape(*np.shape(ids), self.dim)

    def release(self) -> None:
        for chunk in self.chunks:
            chunk.release()

    def to_float32(self) -> np.ndarray:
        """The whole bank as one float32 array in RAM (for small banks and faiss training samples)."""
        return np.concatenate([c.array.astype(np.float32) for c in self.chunks])


class BankTexts:
    """Caption texts by bank id from the memory-mapped Arrow file (no list of every caption)."""

    def __init__(self, path: Path, rows: int | None = None) -> None:
        import pyarrow as pa

        self.path = Path(path)
        try:
            table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
            self.column = table.column(TEXT_COLUMN)
        except (OSError, KeyError, pa.ArrowInvalid) as err:
            raise BankFormatError(f"{self.path}: not a caption-bank Arrow file ({err})") from err
        if rows is not None and len(self.column) != rows:
            raise BankFormatError(f"{self.path}: {len(self.column)} texts, its marker says {rows}")

    def __len__(self) -> int:
        return len(self.column)

    def take(self, ids) -> list[str]:
        import pyarrow as pa

        return self.column.take(pa.array(np.asarray(ids, dtype=np.int64))).to_pylist()

    def slice(self, start: int, stop: int) -> list[str]:
        return self.column.slice(start, stop - start).to_pylist()


def write_texts(path: Path, texts: list[str]) -> None:
    """`texts.arrow` at `path` (written in place: the caller writes to a temporary name and renames)."""
    import pyarrow as pa

    table = pa.table({TEXT_COLUMN: pa.array(texts, pa.large_string())})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 20)


@dataclass(frozen=True)
class BlockPlan:
    query_rows: int
    bank_rows: int
    bytes: int  # the search's own peak allocation by this plan's accounting


FAISS_TILE = (4096, 1024)  # faiss's similarity tile (query x bank rows); only its used part is touched


def block_bytes(query_rows: int, bank_rows: int, dim: int, k: int, device: str = "cpu") -> int:
    """What one step of the blocked search holds: the query block, the bank block (mapped fp16
    pages plus its fp32/device copy), the similarity block (GPU: query block x bank block; CPU:
    faiss's fixed tile), the top-k scratch (the block's values and ids, the merge) and the running
    top-k."""
    if device == "cpu":
        sims = min(query_rows, FAISS_TILE[0]) * min(bank_rows, FAISS_TILE[1]) * 4
    else:
        sims = query_rows * bank_rows * 4
    bank = bank_rows * dim * (2 + (2 if device != "cpu" else 4))
    scratch = query_rows * (3 * k + 2) * 12 * 2
    queries = query_rows * dim * 4 * 2
    return sims + bank + scratch + queries


def plan_blocks(n_queries: int, bank_rows: int, dim: int, k: int, memory_bytes: int, device="cpu"):
    """Block sizes within half of `memory_bytes` (the rest: allocator and page-cache slack, e.g.
    large folios mapped around a bank block): bank blocks of up to 64k rows (enough for full-speed
    matmuls), then as many queries per block as fit (fewer passes over the bank)."""
    budget, memory_bytes = memory_bytes, memory_bytes // 2  # half kept for slack
    bank_block = min(bank_rows, 65536)
    while bank_block > 256 and block_bytes(0, bank_block, dim, k, device) * 4 > memory_bytes:
        bank_block //= 2
    per_query = block_bytes(2, bank_block, dim, k, device) - block_bytes(1, bank_block, dim, k, device)
    fixed = block_bytes(0, bank_block, dim, k, device)
    query_block = max(1, min(n_queries, 16384, (memory_bytes - fixed) // max(per_query, 1)))
    used = block_bytes(query_block, bank_block, dim, k, device)
    if used > memory_bytes:
        raise ValueError(
            f"search_memory_mib: {budget / 2**20:.0f} MiB is too small for a {dim}-d bank "
            f"(needs at least {used / 2**20:.1f} MiB)"
        )
    return BlockPlan(int(query_block), int(bank_block), int(used))


def _readonly_tensor(view: np.ndarray) -> torch.Tensor:
    """A tensor over read-only mapped pages (only ever read: copied into the staging block)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(view)


def _sorted_by_score_then_id(scores: torch.Tensor, ids: torch.Tensor):
    """Rows ordered by score descending, ties by id ascending (ids of -1 last)."""
    order = torch.argsort(torch.where(ids < 0, torch.iinfo(torch.int64).max, ids), dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, order), ids.gather(1, order)


def _block_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, ties at the k-th value broken by lower column (torch.topk leaves them open):
    a row whose (k+1)-th value equals its k-th is sorted stably instead (rare)."""
    extra = 1 if sims.shape[1] > k else 0
    values, cols = sims.topk(k + extra, dim=1)
    if extra:
        crowded = (values[:, k] == values[:, k - 1]).nonzero().flatten()
        values, cols = values[:, :k].clone(), cols[:, :k].clone()
        for row in crowded.tolist():
            vals, order = torch.sort(sims[row], descending=True, stable=True)
            values[row], cols[row] = vals[:k], order[:k]
    return values, cols


class ExactSearch:
    """Blocked exact inner-product search over `BankVectors` on `device` within `memory_mib`."""

    def __init__(self, bank: BankVectors, device: str = "cpu", memory_mib: float = 2048) -> None:
        self.bank, self.device = bank, torch.device(device)
        self.memory_bytes = int(memory_mib * 2**20)
        self.last_plan: BlockPlan | None = None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate-in-the-last-bits top-k (float32 scores), ids -1 beyond the bank."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, k_eff = len(queries), min(k, self.bank.rows)
        out_s = np.full((n, k), -np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        if n == 0 or k_eff == 0:
            return out_s, out_i
        plan = plan_blocks(n, self.bank.rows, self.bank.dim, k_eff, self.memory_bytes, self.device.type)
        self.last_plan = plan
        block_search = self._gpu_blocks if self.device.type == "cuda" else self._cpu_blocks
        for q0 in range(0, n, plan.query_rows):
            q = queries[q0 : q0 + plan.query_rows]
            best_s = torch.full((len(q), 0), -math.inf)
            best_i = torch.full((len(q), 0), -1, dtype=torch.int64)
            for first, s, c in block_search(q, k_eff, plan):
                merged_s, merged_i = _sorted_by_score_then_id(
                    torch.cat([best_s, s], dim=1), torch.cat([best_i, c + first], dim=1)
                )
                best_s, best_i = merged_s[:, :k_eff], merged_i[:, :k_eff]
            out_s[q0 : q0 + len(q), :k_eff] = best_s.numpy()
            out_i[q0 : q0 + len(q), :k_eff] = best_i.numpy()
        return out_s, out_i

    def _cpu_blocks(self, q: np.ndarray, k: int, plan: BlockPlan):
        """(first bank id, scores, columns) per bank block: faiss's exhaustive inner-product search
        (ties keep the lower column) on the block converted to float32 in one staging buffer."""
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        staging = np.empty((plan.bank_rows, self.bank.dim), np.float32)
        for first, view, chunk, row in self.bank.blocks(plan.bank_rows):
            block = staging[: len(view)]
            np.copyto(block, view)  # fp16 file pages -> fp32
            chunk.release(row, row + len(view))
            scores, cols = faiss.knn(q, block, min(k, len(view)), metric=faiss.METRIC_INNER_PRODUCT)
            yield first, torch.from_numpy(scores), torch.from_numpy(cols)

    def _gpu_blocks(self, q: np.ndarray, k: int, plan: BlockPlan):
        """(first bank id, scores, columns) per bank block: an fp16 matmul with fp32 accumulation on
        the GPU (bank block through a pinned staging buffer) and torch's top-k, results on the CPU."""
        qd = torch.from_numpy(q).to(self.device, torch.float16)
        staging = torch.empty((plan.bank_rows, self.bank.dim), dtype=torch.float16).pin_memory()
        for first, view, chunk, row in self.bank.blocks(plan.bank_rows):
            rows = len(view)
            staging[:rows].copy_(_readonly_tensor(view))
            chunk.release(row, row + rows)
            block = staging[:rows].to(self.device, non_blocking=True)
            sims = (qd @ block.T).float()
            del block
            s, c = _block_topk(sims, min(k, rows))
            del sims
            yield first, s.cpu(), c.cpu()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, bank ids) best first, ties by lower id; id -1 (score -inf) beyond the bank."""
        _, ids = self.candidates(queries, k + RESCORE_MARGIN)
        return rescore(self.bank, queries, ids, k)


def rescore(bank: BankVectors, queries: np.ndarray, ids: np.ndarray, k: int):
    """Cosines of each image's candidates in float64, one image at a time (from the fp16 bank),
    the k best by (cosine desc, id asc); duplicate and -1 candidates dropped."""
    queries = np.asarray(queries, dtype=np.float64)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    step = max(1, (16 << 20) // max(1, ids.shape[1] * bank.dim * 8))  # ~16 MiB of float64 rows at once
    for q0 in range(0, len(queries), step):
        cand = ids[q0 : q0 + step]
        rows = bank.gather(cand)  # (q, c, d)
        scores = np.einsum("qcd,qd->qc", rows, queries[q0 : q0 + step])
        for j in range(len(cand)):
            keep = cand[j] >= 0
            cid, cs = cand[j][keep], scores[j][keep]
            cid, first = np.unique(cid, return_index=True)
            cs = cs[first]
            order = np.lexsort((cid, -cs))[:k]
            out_s[q0 + j, : len(order)] = cs[order]
            out_i[q0 + j, : len(order)] = cid[order]
    return out_s, out_i


def exact_reference(bank_f32: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64 with ties by lower id (for tests and the benchmark's recall)."""
    sims = np.asarray(queries, np.float64) @ np.asarray(bank_f32, np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(sims.shape[1]), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1).astype(np.float32), order.astype(np.int64)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact ids (ignoring -1) that `found` has."""
    shares = []
    for f, e in zip(found, exact):
        want = set(e[e >= 0].tolist())
        if want:
            shares.append(len(want & set(f[f >= 0].tolist())) / len(want))
    return float(np.mean(shares)) if shares else 1.0


# --- approximate search: faiss IVF-PQ ------------------------------------------------------------


def ivfpq_params(rows: int, dim: int, nlist: int | None, pq_m: int | None) -> tuple[int, int]:
    """Defaults: nlist ~ sqrt(rows) (a power of two, <= rows / 39), PQ codes of
    dim/8 bytes (a divisor of dim)."""
    if nlist is None:
        nlist = 2 ** round(math.log2(max(1.0, math.sqrt(rows))))
    nlist = max(1, min(nlist, rows // 39 or 1))
    if pq_m is None:
        pq_m = max(1, dim // 8)
        while dim % pq_m:
            pq_m -= 1
    if dim % pq_m:
        raise ValueError(f"pq_m: {pq_m} does not divide the bank's width {dim}")
    return nlist, pq_m


def build_ivfpq(
    bank: BankVectors,
    path: Path,
    nlist: int | None = None,
    pq_m: int | None = None,
    seed: int = 0,
    train_rows: int | None = None,
) -> None:
    """Train an IVF-PQ index on a seeded sample of the bank, add the bank chunk by chunk (fp16 ->
    fp32 one chunk at a time) and write it to `path` (the caller renames it into place)."""
    import faiss

    nlist, pq_m = ivfpq_params(bank.rows, bank.dim, nlist, pq_m)
    nbits = 8 if bank.rows >= 256 * 39 else max(1, min(8, int(math.log2(max(2, bank.rows // 39)))))
    quantizer = faiss.IndexFlatIP(bank.dim)
    index = faiss.IndexIVFPQ(quantizer, bank.dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    want = train_rows or min(bank.rows, max(32 * nlist, 10000))
    sample = np.sort(np.random.default_rng(seed).choice(bank.rows, size=min(want, bank.rows), replace=False))
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(bank.gather(sample).astype(np.float32))
    for _first, view, chunk, row in bank.blocks(1 << 16):
        index.add(np.ascontiguousarray(view, dtype=np.float32))
        chunk.release(row, row + len(view))
    faiss.write_index(index, str(path))


class ApproximateSearch:
    """A cached faiss IVF-PQ index; its candidates are scored again exactly (rescore)."""

    def __init__(self, bank: BankVectors, index_path: Path, nprobe: int = 32) -> None:
        import faiss

        self.bank = bank
        try:
            self.index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            raise BankFormatError(f"{index_path}: not a readable faiss index ({err})") from err
        if self.index.ntotal != bank.rows or self.index.d != bank.dim:
            raise BankFormatError(
                f"{index_path}: index of {self.index.ntotal} x {self.index.d}, "
                f"bank is {bank.rows} x {bank.dim}"
            )
        self.index.nprobe = min(nprobe, self.index.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = min(self.bank.rows, 4 * k + RESCORE_MARGIN)
        _, ids = self.index.search(queries, found) if len(queries) else (None, np.zeros((0, found), np.int64))
        return rescore(self.bank, queries, ids, k)
