"""The captioner protocol, the options every backend takes, and `get_captioner(name)`.

A captioner has two halves so the model never waits on JPEG decoding: `image_transform` runs in
DataLoader workers (PIL image -> tensor; picklable), `caption` runs on batches of those tensors.
Heavy imports (transformers, open_clip, faiss) happen inside the backend modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from captioning.options import GenerationOptions, RuntimeOptions, SearchOptions  # noqa: F401 (re-exported)

BACKENDS = {
    "blip": "captioning.blip",
    "llava": "captioning.llava",
    "retrieval": "captioning.retrieval",
    "alt_text": "captioning.alt_text",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaptionerError(ValueError):
    """A captioner that cannot be built (missing model folder, empty caption bank, bad option)."""


@dataclass
class CaptionBatchResult:
    """Per image: its candidate captions, and their CLIP cosines if the backend computes them."""

    captions: list[list[str]]
    scores: list[list[float]] | None = None
    prompts: list[str] = field(default_factory=list)


class Captioner(Protocol):
    name: str
    model_name: str
    prompts: list[str]
    input_size: int  # the largest image side the model uses; JPEGs are decoded no larger than needed

    def image_transform(self) -> Callable: ...

    def caption(self, pixels: torch.Tensor, alt_texts: list[str]) -> CaptionBatchResult: ...


def get_captioner(name: str, **options) -> Captioner:
    """Build the backend `name` ("blip" | "llava" | "retrieval" | "alt_text") from the typed options
    its `build` takes (captioning/options.py); an option it does not take is a TypeError."""
    if name not in BACKENDS:
        raise CaptionerError(f"unknown caption backend {name!r} (backends: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).build(**options)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CaptionerError(f"unknown dtype {name!r} (dtypes: {', '.join(DTYPES)})")
    return DTYPES[name]
