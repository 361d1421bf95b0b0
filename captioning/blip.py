"""`blip` backend: BLIP and BLIP-2 (transformers), k captions per image; see captioning/generative.py."""

from __future__ import annotations

from captioning.base import CaptionerError, GenerationOptions, RuntimeOptions
from captioning.generative import GenerativeCaptioner


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    runtime: RuntimeOptions = RuntimeOptions(),
) -> GenerativeCaptioner:
    if not model:
        raise CaptionerError("the blip backend needs `model` (a hub name or a local folder)")
    prompts = list(generation.prompts)
    # BLIP conditions on a text prefix; without prompts it captions from the image alone
    return GenerativeCaptioner("blip", model, k, generation, runtime, prompts, prompts)
