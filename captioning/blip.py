"""`blip` backend: BLIP and BLIP-2 (transformers), k captions per image; see captioning/generative.py."""
from __future__ import annotations

from captioning.base import CaptionerError, GenerationOptions, RuntimeOptions
from captioning.generative import GenerativeCaptioner


def build(model: str | None = None, generation: GenerationOptions = GenerationOptions(),
          runtime: RuntimeOptions = RuntimeOptions(), **_unused) -> GenerativeCaptioner:
    if not model:
        raise CaptionerError("the blip backend needs `model` (a hub name or a local folder)")
    prompts = list(generation.prompts)
    if generation.decoding == "prompts" and not prompts:
        raise CaptionerError("decoding 'prompts' needs at least one prompt")
    # BLIP conditions on a text prefix; without prompts it captions from the image alone
    return GenerativeCaptioner("blip", model, generation, runtime, prompts, prompts)
