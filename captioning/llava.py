"""`llava` backend: LLaVA-class models through transformers with the processor's chat template.

Each prompt is wrapped as a user turn with the image; the prompt is stripped from the output.
"""

from __future__ import annotations

from captioning.base import CaptionerError, GenerationOptions, RuntimeOptions
from captioning.generative import GenerativeCaptioner

DEFAULT_PROMPT = "Describe the image in one sentence."


def chat_prompt(processor, prompt: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


class LlavaCaptioner(GenerativeCaptioner):
    def __init__(self, model: str, k: int, generation: GenerationOptions, runtime: RuntimeOptions) -> None:
        self._prompts_as_written = list(generation.prompts) or [DEFAULT_PROMPT]
        super().__init__("llava", model, k, generation, runtime, self._prompts_as_written, [])
        if getattr(self.processor, "chat_template", None) is None:
            raise CaptionerError(f"caption model {model!r}: its processor has no chat template")
        self._prompt_ids = [self._encode_prompt(chat_prompt(self.processor, p)) for p in self.prompts]


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    runtime: RuntimeOptions = RuntimeOptions(),
) -> LlavaCaptioner:
    if not model:
        raise CaptionerError("the llava backend needs `model` (a hub name or a local folder)")
    return LlavaCaptioner(model, k, generation, runtime)
