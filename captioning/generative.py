"""Generative captioners through transformers: every family in captioning/families.py (BLIP, BLIP-2,
LLaVA-1.5/NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM, PaliGemma, Florence-2).

The model is a hub name or a local folder, loaded with `from_pretrained` either way. k captions per
image come from nucleus sampling (`num_return_sequences`), beam search, or one per prompt.

The model's own processor runs on the whole batch (in the DataLoader worker, `BatchProcessor`): the
pictures with one prompt text each, written with the family's chat template or task prompt, padded on
the left. So each family gets exactly the inputs its documented call makes: LLaVA-NeXT's `image_sizes`
and per-picture tile counts, Qwen's `image_grid_thw` over flattened patches, Idefics3's
`pixel_attention_mask`, token counts that differ per picture. The prompt is cut off each output by
token position (`families.prompt_length`), never by matching text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.base import CaptionBatchResult, CaptionerError, GenerationOptions, RuntimeOptions, torch_dtype
from captioning.families import Family, UnsupportedFamily, decode_size, family_of, prompt_length, prompt_text

NOT_GENERATE_INPUTS = {"labels"}  # PaliGemma's processor adds training labels; generate needs none


class BatchProcessor:
    """list of PIL images -> one processor output per prompt (dicts of tensors). Runs in DataLoader
    workers (picklable); `batched` tells the loader to call it on a batch, not on one picture."""

    batched = True

    def __init__(self, processor, family: Family, texts: list[str | None]) -> None:
        self.processor, self.family, self.texts = processor, family, texts

    def __call__(self, images: list) -> list[dict[str, torch.Tensor]]:
        return [self._one(images, text) for text in self.texts]

    def _one(self, images: list, text: str | None) -> dict[str, torch.Tensor]:
        if self.family.images_per_text:
            images = [[image] for image in images]
        if text is None:  # caption from the picture alone (BLIP, BLIP-2 without a prefix)
            out = self.processor(images=images, return_tensors="pt")
        else:
            out = self.processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
        return {k: v for k, v in out.items() if k not in NOT_GENERATE_INPUTS and isinstance(v, torch.Tensor)}


def load_pretrained(model: str, runtime: RuntimeOptions):
    """(model, processor, model_type) from a hub name or a local folder."""
    import transformers

    looks_local = model.startswith(("/", "./", "../", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise CaptionerError(f"model folder not found: {model}")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
        family = family_of(config.model_type)
        # the library's default image backend (torchvision here), as the model cards load it
        processor = transformers.AutoProcessor.from_pretrained(model)
        network = getattr(transformers, family.model_class).from_pretrained(
            model, dtype=torch_dtype(runtime.dtype)
        )
    except UnsupportedFamily as err:
        raise CaptionerError(f"caption model {model!r}: {err}") from err
    except (OSError, ValueError) as err:
        raise CaptionerError(f"cannot load caption model {model!r}: {str(err).splitlines()[0]}") from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and not family.encoder_decoder:
        tokenizer.padding_side = "left"  # batched decoder-only generation continues every row at the end
    return network.to(runtime.device).eval(), processor, config.model_type


class GenerativeCaptioner:
    """k captions per image from a vision-language model; see the module docstring."""

    def __init__(
        self, name: str, model: str, k: int, options: GenerationOptions, runtime: RuntimeOptions
    ) -> None:
        self.name, self.model_name, self.k, self.options, self.runtime = name, model, k, options, runtime
        self.model, self.processor, self.model_type = load_pretrained(model, runtime)
        self.family = family_of(self.model_type)
        default = [self.family.default_prompt] if self.family.default_prompt else []
        self.prompts = list(options.prompts) or default  # as written (recorded in caption shards)
        try:
            texts = [prompt_text(self.family, self.processor, p) for p in self.prompts]
        except UnsupportedFamily as err:
            raise CaptionerError(f"caption model {model!r}: {err}") from err
        if options.decoding != "prompts":  # k draws from the first prompt
            texts = texts[:1]
        self._texts: list[str | None] = texts or [None]
        self.input_size = decode_size(self.family, self.processor.image_processor)

    def image_transform(self) -> BatchProcessor:
        return BatchProcessor(self.processor, self.family, self._texts)

    @torch.inference_mode()
    def caption(self, inputs: list[dict[str, torch.Tensor]], alt_texts: list[str]) -> CaptionBatchResult:
        """`inputs`: the BatchProcessor's output for the batch's pictures (one dict per prompt)."""
        n = len(alt_texts)
        if self.options.decoding == "prompts":
            per_prompt = [self._generate(batch, 1) for batch in inputs]
            captions = [[texts[i][0] for texts in per_prompt] for i in range(n)]
        else:
            captions = self._generate(inputs[0], self.k)
        # prompts were cut off by token position: no text to strip in cleanup
        return CaptionBatchResult(captions, prompts=[])

    def _generate(self, batch: dict[str, torch.Tensor], k: int) -> list[list[str]]:
        batch = {k_: self._to_device(v) for k_, v in batch.items()}
        output = self.model.generate(**batch, **self._decoding_kwargs(k))
        queries = getattr(self.model.config, "num_query_tokens", 0)
        start = prompt_length(self.family, self.model_type, batch, queries)
        texts = self.processor.batch_decode(output[:, start:], skip_special_tokens=True)
        rows = len(texts) // k
        return [texts[i * k : (i + 1) * k] for i in range(rows)]

    def _to_device(self, value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point():  # pixels; ids, masks, image sizes and grids keep their dtype
            return value.to(self.runtime.device, torch_dtype(self.runtime.dtype))
        return value.to(self.runtime.device)

    def _decoding_kwargs(self, k: int) -> dict:
        opts = self.options
        common = {
            "max_new_tokens": opts.max_new_tokens,
            "min_new_tokens": opts.min_new_tokens,
            "num_return_sequences": k,
        }
        if opts.decoding == "sample":
            # pure nucleus sampling: a checkpoint's generation_config (Qwen's top_k=1, Florence-2's
            # num_beams=3) must not turn it into greedy or beam sampling
            return {
                **common,
                "do_sample": True,
                "top_p": opts.top_p,
                "top_k": 0,
                "temperature": opts.temperature,
                "num_beams": 1,
            }
        beams = max(opts.num_beams or k, k)
        return {**common, "do_sample": False, "num_beams": beams}
