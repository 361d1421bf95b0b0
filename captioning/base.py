"""The captioner protocol, the options every backend takes, and `get_captioner(name)`.

A captioner has two halves so the model never waits on JPEG decoding: `image_transform` runs in
DataLoader workers (picklable), `caption` runs on what the workers made of a batch. The transform is
either per picture (PIL image -> tensor; a batch gets them stacked) or, with `batched = True`, per
batch (list of PIL images -> any picklable inputs, e.g. a VLM processor's padded output), or, with
`encoded = True`, per picture on the file's bytes as stored (never decoded; a batch gets a list).
Heavy imports (transformers, open_clip, faiss) happen inside the backend modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from captioning.options import (  # noqa: F401 (re-exported)
    GenerationOptions,
    RuntimeOptions,
    SearchOptions,
    ServerOptions,
)

BACKENDS = {
    "blip": "captioning.blip",
    "llava": "captioning.llava",
    "vlm": "captioning.vlm",
    "retrieval": "captioning.retrieval",
    "alt_text": "captioning.alt_text",
    "server": "captioning.server",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaptionerError(ValueError):
    """A captioner that cannot be built (missing model folder, empty caption bank, bad option)."""


@dataclass
class CaptionBatchResult:
    """Per image: its candidate captions, and their CLIP cosines if the backend computes them; a backend
    that can fail per image (`server`) gives `failed`: per image None or why it has no captions."""

    captions: list[list[str]]
    scores: list[list[float]] | None = None
    prompts: list[str] = field(default_factory=list)
    failed: list[str | None] = field(default_factory=list)


class Captioner(Protocol):
    name: str
    model_name: str
    prompts: list[str]
    # JPEGs are DCT-scaled while decoding only as long as both sides stay >= this (the side the model's
    # processor needs to see what the full picture would give it)
    input_size: int

    def image_transform(self) -> Callable: ...

    def caption(self, inputs: Any, alt_texts: list[str]) -> CaptionBatchResult:
        """Captions for a batch: `inputs` is what `image_transform` made of the batch's decodable
        pictures (stacked tensors, or a batched transform's output), `alt_texts` one per picture."""


def get_captioner(name: str, **options) -> Captioner:
    """Build the backend `name` ("blip" | "llava" | "vlm" | "retrieval" | "alt_text" | "server") from the
    typed options its `build` takes (captioning/options.py); an option it does not take is a TypeError."""
    if name not in BACKENDS:
        raise CaptionerError(f"unknown caption backend {name!r} (backends: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).build(**options)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CaptionerError(f"unknown dtype {name!r} (dtypes: {', '.join(DTYPES)})")
    return DTYPES[name]
