"""Retrieval and classification metrics on embeddings (numpy, float32, L2-normalised inside).

Pure functions, computed blockwise over the queries so that 100k x 100k retrieval needs only one
block of similarities at a time (`block_rows` x N). Protocols: shared/METHOD.md.
Ties in similarity rank in dataset order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

BLOCK_ELEMENTS = 1 << 24  # similarities per block: 64 MiB of float32 (plus the sort's indices)


def normalise(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def _blocks(rows: int, columns: int, block_rows: int | None) -> Iterator[slice]:
    step = block_rows or max(1, BLOCK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _average_precisions(sims: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP per row: (1/R) * sum_j j / rank_j over the R relevant items, ranked by descending similarity."""
    order = np.argsort(-sims, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    counts = hits.sum(axis=1)
    return np.where(counts > 0, (precision * hits).sum(axis=1) / np.maximum(counts, 1), 0.0)


def average_precisions(emb: np.ndarray, labels: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """AP of every item querying all items, itself included (the GPR1200 protocol)."""
    emb, labels = normalise(emb), np.asarray(labels)
    out = np.empty(len(emb), dtype=np.float64)
    for rows in _blocks(len(emb), len(emb), block_rows):
        sims = emb[rows] @ emb.T
        out[rows] = _average_precisions(sims, labels[rows, None] == labels[None, :])
    return out


def retrieval_map(emb: np.ndarray, labels: np.ndarray, block_rows: int | None = None) -> float:
    """Mean AP over all queries; relevant = same label (including the query itself)."""
    return float(average_precisions(emb, labels, block_rows).mean())


def retrieval_map_by_group(
    emb: np.ndarray, labels: np.ndarray, groups: np.ndarray, block_rows: int | None = None
) -> dict[str, float]:
    """mAP per group of queries (each query still searches every item); e.g. GPR1200's subsets."""
    aps, groups = average_precisions(emb, labels, block_rows), np.asarray(groups)
    return {str(g): float(aps[groups == g].mean()) for g in dict.fromkeys(groups.tolist())}


def knn_accuracy(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    k: int = 21,
    temperature: float = 0.1,
    block_rows: int | None = None,
) -> float:
    """Top-1 accuracy of a k-NN vote weighted by exp(cos / temperature); a tied vote picks the
    class seen first in `train_labels`."""
    train_emb, test_emb = normalise(train_emb), normalise(test_emb)
    classes, train_idx = np.unique(np.asarray(train_labels), return_inverse=True)
    first_seen = np.argsort(np.unique(train_idx, return_index=True)[1], kind="stable")
    k = min(k, len(train_emb))
    predicted = []
    for rows in _blocks(len(test_emb), len(train_emb), block_rows):
        sims = test_emb[rows] @ train_emb.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        votes = np.zeros((sims.shape[0], len(classes)))
        np.add.at(votes, (np.arange(sims.shape[0])[:, None], train_idx[top]), weights)
        predicted.append(first_seen[np.argmax(votes[:, first_seen], axis=1)])
    hits = classes[np.concatenate(predicted)] == np.asarray(test_labels)
    return float(hits.mean())


def zero_shot_accuracy(
    img_emb: np.ndarray, labels: np.ndarray, class_text_emb: np.ndarray, block_rows: int | None = None
) -> dict[str, float]:
    """Top-1/top-5 of logits 100 * cos(image, class text); labels are row indices of class_text_emb."""
    img_emb, class_emb, labels = normalise(img_emb), normalise(class_text_emb), np.asarray(labels)
    top = min(5, len(class_emb))
    top1 = top5 = 0
    for rows in _blocks(len(img_emb), len(class_emb), block_rows):
        logits = 100.0 * img_emb[rows] @ class_emb.T
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, :top]
        top1 += int((ranked[:, 0] == labels[rows]).sum())
        top5 += int((ranked == labels[rows, None]).any(axis=1).sum())
    return {"top1": top1 / len(img_emb), "top5": top5 / len(img_emb)}


def _owner_mask(owners: Sequence, rows: slice, images: int) -> np.ndarray:
    """Relevant images per caption: txt_owner[k] is one image index or a sequence of them."""
    mask = np.zeros((rows.stop - rows.start, images), dtype=bool)
    for i, owner in enumerate(owners[rows]):
        mask[i, np.atleast_1d(np.asarray(owner, dtype=np.int64))] = True
    return mask


def text_to_image_recall(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    txt_owner: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    block_rows: int | None = None,
) -> dict[str, float]:
    """Recall@k: the share of captions with a relevant image (txt_owner[k]: an index or indices)
    among their top k images."""
    img_emb, txt_emb = normalise(img_emb), normalise(txt_emb)
    owners = list(txt_owner)
    deepest = min(max(ks), len(img_emb))
    hits = {k: 0 for k in ks}
    for rows in _blocks(len(txt_emb), len(img_emb), block_rows):
        sims = txt_emb[rows] @ img_emb.T
        ranked = np.argsort(-sims, axis=1, kind="stable")[:, :deepest]
        found = np.take_along_axis(_owner_mask(owners, rows, len(img_emb)), ranked, axis=1)
        for k in ks:
            hits[k] += int(found[:, :k].any(axis=1).sum())
    return {f"R@{k}": hits[k] / len(txt_emb) for k in ks}


def text_to_image_map(
    img_emb: np.ndarray, txt_emb: np.ndarray, txt_owner: Sequence, block_rows: int | None = None
) -> float:
    """mAP of captions querying all images; relevant = txt_owner[k] (an index or indices). Stays
    informative where many images share one caption and Recall@k saturates."""
    img_emb, txt_emb = normalise(img_emb), normalise(txt_emb)
    owners = list(txt_owner)
    aps = []
    for rows in _blocks(len(txt_emb), len(img_emb), block_rows):
        sims = txt_emb[rows] @ img_emb.T
        aps.append(_average_precisions(sims, _owner_mask(owners, rows, len(img_emb))))
    return float(np.concatenate(aps).mean())
