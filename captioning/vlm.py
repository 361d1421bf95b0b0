"""`vlm` backend: any vision-language family in captioning/families.py through transformers, k captions
per image; the prompt is written the family's own way (chat template, PaliGemma prefix, Florence-2 task
token, BLIP text prefix). The `blip` and `llava` backends are the same captioner under their old names.
"""

from __future__ import annotations

from captioning.base import CaptionerError, GenerationOptions, RuntimeOptions
from captioning.generative import GenerativeCaptioner


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    runtime: RuntimeOptions = RuntimeOptions(),
    name: str = "vlm",
) -> GenerativeCaptioner:
    if not model:
        raise CaptionerError(f"the {name} backend needs `model` (a hub name or a local folder)")
    return GenerativeCaptioner(name, model, k, generation, runtime)
