"""`blip` backend: BLIP and BLIP-2 (any family works; see captioning/vlm.py). Prompts are text prefixes;
without prompts the model captions from the image alone."""

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
    return vlm.build(model, k, generation, runtime, name="blip")
