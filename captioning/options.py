"""The options each caption backend takes, as typed models validated strictly (unknown keys are
errors that name the key). The caption stage's manifest sections are these classes:

    generation: GenerationOptions   blip, llava: how k captions are drawn per image
    retrieval:  SearchOptions       retrieval: how the bank is searched (the stage adds the bank file)

pydantic only, so the manifest can be validated without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class GenerationOptions(BaseModel):
    """How a generative backend draws its k captions: nucleus sampling, beam search or one per prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decoding: Literal["sample", "beam", "prompts"] = "sample"
    prompts: list[str] = []  # blip: text prefixes; llava: user turns (default: backend's own prompt)
    max_new_tokens: PositiveInt = 30
    min_new_tokens: int = Field(5, ge=0)
    temperature: float = Field(1.0, gt=0)  # sample
    top_p: float = Field(0.9, gt=0, le=1)  # sample
    num_beams: PositiveInt | None = None  # beam; default: k

    @model_validator(mode="after")
    def _prompts_for_prompt_decoding(self) -> "GenerationOptions":
        if self.decoding == "prompts" and not self.prompts:
            raise ValueError("decoding 'prompts' needs a non-empty `prompts` list")
        return self


class SearchOptions(BaseModel):
    """How the retrieval backend searches the caption bank: top-k above a cosine threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(0.271, ge=-1, le=1)  # the paper's value for ViT-L/14 on CC12M
    index: Literal["flat", "ivf"] = "flat"  # flat: exact; ivf: approximate, for tens of millions
    ivf_nlist: PositiveInt = 1024
    ivf_nprobe: PositiveInt = 32


@dataclass(frozen=True)
class RuntimeOptions:
    """Where a model runs; speed only, never part of a fingerprint."""

    device: str = "cpu"
    dtype: str = "float32"
