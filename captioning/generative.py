"""Generative captioners through transformers: BLIP, BLIP-2 and LLaVA-class models.

The model is a hub name or a local folder, loaded with `from_pretrained` either way. k captions
per image come from nucleus sampling (`num_return_sequences`), beam search, or one per prompt.
Prompt token ids are made once by the model's own processor (on a blank image, so BLIP-2's query
tokens and LLaVA's expanded image tokens are right) and repeated for every batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from captioning.base import CaptionBatchResult, CaptionerError, GenerationOptions, RuntimeOptions, torch_dtype
from captioning.cleanup import strip_prompt

# model_type -> class name in transformers; anything else goes through AutoModelForImageTextToText
MODEL_CLASSES = {
    "blip": "BlipForConditionalGeneration",
    "blip-2": "Blip2ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
DECODER_ONLY = {"blip-2", "llava"}  # their output starts with the full input ids


class ImageProcessorTransform:
    """PIL image -> pixel tensor with the model's own image processor (picklable, for workers)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def load_pretrained(model: str, runtime: RuntimeOptions):
    """(model, processor, model_type) from a hub name or a local folder."""
    import transformers

    looks_local = model.startswith(("/", "./", "../", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise CaptionerError(f"model folder not found: {model}")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
        processor = transformers.AutoProcessor.from_pretrained(model, use_fast=True)  # torchvision-backed
        cls = getattr(transformers, MODEL_CLASSES.get(config.model_type, "AutoModelForImageTextToText"))
        network = cls.from_pretrained(model, dtype=torch_dtype(runtime.dtype))
    except (OSError, ValueError) as err:
        raise CaptionerError(f"cannot load caption model {model!r}: {str(err).splitlines()[0]}") from err
    return network.to(runtime.device).eval(), processor, config.model_type


class GenerativeCaptioner:
    """k captions per image from a vision-language model; see the module docstring."""

    def __init__(
        self,
        name: str,
        model: str,
        k: int,
        options: GenerationOptions,
        runtime: RuntimeOptions,
        prompts: list[str],
        chat_prompts: list[str],
    ) -> None:
        self.name, self.model_name, self.k, self.options, self.runtime = name, model, k, options, runtime
        self.model, self.processor, self.model_type = load_pretrained(model, runtime)
        self.prompts = prompts  # as written in the manifest (recorded in caption shards)
        self._prompt_ids = [self._encode_prompt(text) for text in chat_prompts]

    def image_transform(self) -> ImageProcessorTransform:
        return ImageProcessorTransform(self.processor.image_processor)

    @property
    def input_size(self) -> int:
        """The largest side the model looks at (JPEGs may be decoded at a reduced scale down to it)."""
        image_processor = self.processor.image_processor
        sizes = [
            v
            for d in (getattr(image_processor, "crop_size", None), image_processor.size)
            if d
            for v in dict(d).values()
            if isinstance(v, int)
        ]
        return max(sizes)

    def _encode_prompt(self, text: str) -> torch.Tensor:
        blank = Image.new("RGB", (self.input_size, self.input_size))
        return self.processor(images=[blank], text=[text], return_tensors="pt")["input_ids"][0]

    @torch.inference_mode()
    def caption(self, pixels: torch.Tensor, alt_texts: list[str]) -> CaptionBatchResult:
        pixels = pixels.to(self.runtime.device, torch_dtype(self.runtime.dtype))
        if self.options.decoding == "prompts":
            per_prompt = [self._generate(pixels, ids, 1) for ids in self._prompt_ids]
            captions = [[texts[i][0] for texts in per_prompt] for i in range(len(pixels))]
        else:
            ids = self._prompt_ids[0] if self._prompt_ids else None
            captions = self._generate(pixels, ids, self.k)
        return CaptionBatchResult(captions, prompts=self.prompts)

    def _generate(self, pixels: torch.Tensor, prompt_ids: torch.Tensor | None, k: int) -> list[list[str]]:
        inputs = {"pixel_values": pixels}
        if prompt_ids is not None:
            inputs["input_ids"] = prompt_ids.to(self.runtime.device).repeat(len(pixels), 1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        output = self.model.generate(**inputs, **self._decoding_kwargs(k))
        if self.model_type in DECODER_ONLY and prompt_ids is not None:
            output = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        texts = [strip_prompt(t, self.prompts) for t in texts]
        return [texts[i * k : (i + 1) * k] for i in range(len(pixels))]

    def _decoding_kwargs(self, k: int) -> dict:
        opts = self.options
        common = {
            "max_new_tokens": opts.max_new_tokens,
            "min_new_tokens": opts.min_new_tokens,
            "num_return_sequences": k,
        }
        if opts.decoding == "sample":
            return {**common, "do_sample": True, "top_p": opts.top_p, "temperature": opts.temperature}
        beams = max(opts.num_beams or k, k)
        return {**common, "do_sample": False, "num_beams": beams}
