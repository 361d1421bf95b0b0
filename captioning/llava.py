"""`llava` backend, kept for existing manifests: LLaVA-class models with the processor's chat template
(each prompt a user turn with the image). The same captioner as `vlm` (captioning/vlm.py)."""

from __future__ import annotations

from captioning import vlm
from captioning.base import GenerationOptions, RuntimeOptions
from captioning.generative import GenerativeCaptioner


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    runtime: RuntimeOptions = RuntimeOptions(),
) -> GenerativeCaptioner:
    return vlm.build(model, k, generation, runtime, name="llava")
