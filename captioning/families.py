"""What the generative captioners know about each transformers vision-language family: its model class,
how a caption prompt becomes the processor's text (raw prefix, the chat template, a task token), how
large a picture its processor looks at, and where the generated tokens start in `generate`'s output.

Reads a loaded processor and model config only; no I/O. Any model type not listed here is refused with
an error that names the ones that are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DEFAULT_CHAT_PROMPT = "Describe the image in one sentence."


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_class: str  # in transformers
    prompt_style: Literal["prefix", "chat", "paligemma", "task"]
    default_prompt: str | None  # None: caption from the image alone
    # fixed: one resize/crop (a JPEG may be decoded at a reduced scale); tiles / pixels / longest_edge:
    # any-resolution processors that look at the whole picture up to a budget (see `decode_size`)
    resolution: Literal["fixed", "tiles", "pixels", "longest_edge"] = "fixed"
    images_per_text: bool = False  # the processor takes one list of images per text (Idefics3)
    encoder_decoder: bool = False  # output holds only decoder tokens, after one start token


FAMILIES = {
    "blip": Family("BLIP", "BlipForConditionalGeneration", "prefix", None),
    "blip-2": Family("BLIP-2", "Blip2ForConditionalGeneration", "prefix", None),
    "llava": Family("LLaVA-1.5", "LlavaForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT),
    "llava_next": Family(
        "LLaVA-NeXT", "LlavaNextForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "tiles"
    ),
    "llava_onevision": Family(
        "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "tiles"
    ),
    "qwen2_vl": Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "pixels"),
    "qwen2_5_vl": Family(
        "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "pixels"
    ),
    "idefics3": Family(
        "Idefics3", "Idefics3ForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "longest_edge", True
    ),
    "smolvlm": Family(
        "SmolVLM", "SmolVLMForConditionalGeneration", "chat", DEFAULT_CHAT_PROMPT, "longest_edge", True
    ),
    "paligemma": Family("PaliGemma", "PaliGemmaForConditionalGeneration", "paligemma", "caption en"),
    "florence2": Family(
        "Florence-2",
        "Florence2ForConditionalGeneration",
        "task",
        "<MORE_DETAILED_CAPTION>",
        encoder_decoder=True,
    ),
}


class UnsupportedFamily(ValueError):
    pass


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        names = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise UnsupportedFamily(
            f"model type {model_type!r} is not a supported caption family (supported: {names})"
        )
    return FAMILIES[model_type]


def prompt_text(family: Family, processor, prompt: str) -> str:
    """The processor's `text` for one caption prompt, written the way the family's model card does."""
    if family.prompt_style == "chat":
        if getattr(processor, "chat_template", None) is None:
            raise UnsupportedFamily(f"{family.name}: the processor has no chat template")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    if family.prompt_style == "paligemma":
        # the processor puts image tokens + BOS before the prefix either way; naming the image
        # token keeps it from warning on every batch
        return processor.image_token + prompt
    return prompt  # BLIP prefixes, Florence-2 task tokens (the processor expands them)


def decode_size(family: Family, image_processor) -> int:
    """The side both sides of a decoded picture must keep so the processor sees what it would see in the
    full picture: JPEGs are DCT-scaled by 1/2, 1/4, 1/8 only while both sides stay at least this."""
    size = dict(getattr(image_processor, "size", None) or {})
    if family.resolution == "tiles":  # LLaVA-NeXT/OneVision pick a tile grid up to the largest pinpoint
        return max(max(p) for p in image_processor.image_grid_pinpoints)
    if family.resolution == "pixels":  # Qwen: `longest_edge` is a pixel count, the budget of the resize
        budget = getattr(image_processor, "max_pixels", None) or size["longest_edge"]
        return math.isqrt(int(budget) - 1) + 1
    if family.resolution == "longest_edge":  # Idefics3: longest side resized to this, then tiled
        return int(size["longest_edge"])
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    return max(v for v in (*size.values(), *crop.values()) if isinstance(v, int))


def prompt_length(family: Family, model_type: str, inputs: dict, num_query_tokens: int) -> int:
    """How many leading tokens of each `generate` output row are input, not generated."""
    if family.encoder_decoder:
        return 1  # the decoder start token
    ids = inputs.get("input_ids")
    if model_type == "blip":  # BLIP's decoder starts from the prompt minus its final [SEP], or [BOS]
        return ids.shape[1] - 1 if ids is not None else 1
    if ids is None and model_type == "blip-2":  # it builds query-image tokens + BOS itself
        return num_query_tokens + 1
    return ids.shape[1] if ids is not None else 0
