"""`retrieval` backend, the paper's method: each image keeps the top-k caption-bank captions whose
CLIP cosine with it is above a threshold (defaults k=20, threshold 0.271; an image may get none).

The bank texts and their embeddings are given (the caption stage embeds the bank once and caches
it under the run root); images are embedded with the same model's image tower.
"""

from __future__ import annotations

import numpy as np
import torch

from captioning.base import CaptionBatchResult, CaptionerError
from captioning.clip_models import ClipModel
from captioning.knn import build_index, search, top_k_above
from captioning.options import SearchOptions


class RetrievalCaptioner:
    name = "retrieval"
    prompts: list[str] = []

    def __init__(
        self,
        clip: ClipModel,
        bank_texts: list[str],
        bank_embeddings: np.ndarray,
        k: int,
        options: SearchOptions,
    ) -> None:
        self.clip, self.model_name = clip, clip.name
        self.bank_texts, self.k, self.threshold = bank_texts, k, options.threshold
        self.index = build_index(bank_embeddings, options.index, options.ivf_nlist, options.ivf_nprobe)

    def image_transform(self):
        return self.clip.preprocess

    @property
    def input_size(self) -> int:
        return self.clip.image_size

    def caption(self, pixels: torch.Tensor, alt_texts: list[str]) -> CaptionBatchResult:
        image_embeddings = self.clip.encode_images(pixels).numpy()
        scores, ids = search(self.index, image_embeddings, self.k)
        hits = top_k_above(scores, ids, self.threshold)
        return CaptionBatchResult(
            [[self.bank_texts[i] for i, _ in row] for row in hits], [[s for _, s in row] for row in hits]
        )


def build(
    clip: ClipModel,
    bank_texts: list[str],
    bank_embeddings: np.ndarray,
    k: int = 20,
    options: SearchOptions = SearchOptions(),
) -> RetrievalCaptioner:
    if clip is None:
        raise CaptionerError("the retrieval backend needs an open_clip model")
    if not bank_texts or bank_embeddings is None or len(bank_texts) != len(bank_embeddings):
        raise CaptionerError(
            "the retrieval backend needs a non-empty caption bank with one embedding per caption"
        )
    return RetrievalCaptioner(clip, bank_texts, bank_embeddings, k, options)
