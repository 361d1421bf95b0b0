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

BACKENDS = {"blip": "captioning.blip", "llava": "captioning.llava", "retrieval": "captioning.retrieval",
            "alt_text": "captioning.alt_text"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaptionerError(ValueError):
    """A captioner that cannot be built (missing model folder, empty caption bank, bad option)."""


@dataclass(frozen=True)
class GenerationOptions:
    """How generative backends pick k captions: nucleus sampling, beam search or one per prompt."""

    captions_per_image: int = 5
    decoding: str = "sample"  # sample | beam | prompts
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    num_beams: int | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "cpu"
    dtype: str = "float32"


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
    """Build the backend `name` ("blip" | "llava" | "retrieval" | "alt_text")."""
    if name not in BACKENDS:
        raise CaptionerError(f"unknown caption backend {name!r} (backends: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).build(**options)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CaptionerError(f"unknown dtype {name!r} (dtypes: {', '.join(DTYPES)})")
    return DTYPES[name]
