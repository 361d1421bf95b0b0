"""`retrieval` backend, the paper's method: each image keeps the top-k caption-bank captions whose
CLIP cosine with it is above a threshold (defaults k=20, threshold 0.271; an image may get none).

The bank (texts by id and fp16 embeddings, memory-mapped; see captioning/bank_search.py) is given:
the caption stage embeds it once per run and caches it under the run root. Images are embedded with
the same model's image tower and searched exactly in blocks on the model's device (`index: exact`)
or with a cached faiss IVF-PQ index (`index: ivfpq`), whose recall@k against exact search is logged
over the first `recall_sample` images. Scores are per image, ties by lower bank id, so an image's
captions do not depend on the other images of its batch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from captioning.bank_search import ExactSearch, recall_at_k
from captioning.base import CaptionBatchResult, CaptionerError
from captioning.clip_models import ClipModel
from captioning.knn import top_k_above
from captioning.options import SearchOptions

log = logging.getLogger(__name__)


class RetrievalCaptioner:
    name = "retrieval"
    prompts: list[str] = []

    def __init__(self, clip: ClipModel, bank, k: int, options: SearchOptions, approximate=None) -> None:
        self.clip, self.model_name = clip, clip.name
        self.bank, self.k, self.threshold = bank, k, options.threshold
        self.exact = ExactSearch(bank.vectors, clip.device, options.search_memory_mib)
        self.approximate = approximate
        self.recall_sample, self._recall = options.recall_sample, [0.0, 0]

    def image_transform(self):
        return self.clip.preprocess

    @property
    def input_size(self) -> int:
        return self.clip.image_size

    def search(self, image_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.approximate is None:
            return self.exact.search(image_embeddings, self.k)
        scores, ids = self.approximate.search(image_embeddings, self.k)
        self._measure_recall(image_embeddings, ids)
        return scores, ids

    def _measure_recall(self, image_embeddings: np.ndarray, ids: np.ndarray) -> None:
        total, seen = self._recall
        take = min(len(ids), self.recall_sample - seen)
        if take <= 0:
            return
        _, want = self.exact.search(image_embeddings[:take], self.k)
        self._recall = [total + recall_at_k(ids[:take], want) * take, seen + take]
        if self._recall[1] >= self.recall_sample:
            log.info(
                "caption bank: ivfpq recall@%d against exact search = %.4f on %d images",
                self.k,
                self._recall[0] / self._recall[1],
                self._recall[1],
            )

    @property
    def recall(self) -> float | None:
        return self._recall[0] / self._recall[1] if self._recall[1] else None

    def caption(self, pixels: torch.Tensor, alt_texts: list[str]) -> CaptionBatchResult:
        return self.caption_embeddings(self.encode(pixels))

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit image embeddings of a batch, to search now or together with other batches."""
        return self.clip.encode_images(pixels).numpy()

    def caption_embeddings(self, image_embeddings: np.ndarray) -> CaptionBatchResult:
        """Top-k bank captions above the threshold for each embedding (one search for all)."""
        scores, ids = self.search(image_embeddings)
        hits = top_k_above(scores, ids, self.threshold)
        texts = self.bank.texts.take([i for row in hits for i, _ in row]) if any(hits) else []
        captions, start = [], 0
        for row in hits:
            captions.append(texts[start : start + len(row)])
            start += len(row)
        return CaptionBatchResult(captions, [[s for _, s in row] for row in hits])


def build(
    clip: ClipModel, bank, k: int = 20, options: SearchOptions = SearchOptions(), approximate=None
) -> RetrievalCaptioner:
    """`bank` has `.texts` (BankTexts) and `.vectors` (BankVectors) of the same length; `approximate`
    is an opened ApproximateSearch when `options.index` is 'ivfpq'."""
    if clip is None:
        raise CaptionerError("the retrieval backend needs an open_clip model")
    if bank is None or len(bank.texts) == 0 or len(bank.texts) != len(bank.vectors):
        raise CaptionerError(
            "the retrieval backend needs a non-empty caption bank with one embedding per caption"
        )
    if options.index == "ivfpq" and approximate is None:
        raise CaptionerError("index 'ivfpq' needs the bank's IVF-PQ index")
    return RetrievalCaptioner(clip, bank, k, options, approximate)
