"""Nearest neighbours by inner product with faiss: exact (`flat`) or IVF for banks of tens of millions.

Vectors are L2-normalised float32, so inner product is cosine.
"""

from __future__ import annotations

import numpy as np
import torch


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 1024, nprobe: int = 32, seed: int = 0):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(vectors) // 39 or 1))  # faiss wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).permutation(len(vectors))[: nlist * 256]
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat, ivf)")
    index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, bank ids), best first; ids are -1 where fewer than k exist."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def brute_force_topk(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same search with torch, for checking faiss on small banks."""
    sims = torch.from_numpy(queries) @ torch.from_numpy(bank).T
    values, ids = sims.topk(min(k, bank.shape[0]), dim=1)
    return values.numpy(), ids.numpy()


def top_k_above(scores: np.ndarray, ids: np.ndarray, threshold: float) -> list[list[tuple[int, float]]]:
    """Per query, the (id, cosine) pairs with cosine > threshold, best first."""
    return [
        [(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0 and s > threshold]
        for row_s, row_i in zip(scores, ids)
    ]
