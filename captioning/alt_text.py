"""`alt_text` backend: the caption downloaded with the image, as its single caption (a baseline)."""

from __future__ import annotations

import torch

from captioning.base import CaptionBatchResult


def _no_pixels(image) -> torch.Tensor:
    return torch.zeros(0)


class AltTextCaptioner:
    name = "alt_text"
    model_name = "alt_text"
    prompts: list[str] = []
    input_size = 1  # pixels are not used: decode at the smallest scale, only to spot corrupt images

    def image_transform(self):
        return _no_pixels

    def caption(self, pixels: torch.Tensor, alt_texts: list[str]) -> CaptionBatchResult:
        return CaptionBatchResult([[t] if t and t.strip() else [] for t in alt_texts])


def build() -> AltTextCaptioner:
    return AltTextCaptioner()
