"""The options each caption backend takes, as typed models validated strictly (unknown keys are
errors that name the key). The caption stage's manifest sections are these classes:

    generation: GenerationOptions   blip, llava, vlm: how k captions are drawn per image
    retrieval:  SearchOptions       retrieval: how the bank is searched (the stage adds the bank file)
    server:     ServerOptions       server: which OpenAI-compatible server, and how it is called

pydantic only, so the manifest can be validated without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator


class GenerationOptions(BaseModel):
    """How a generative backend draws its k captions: nucleus sampling, beam search or one per prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decoding: Literal["sample", "beam", "prompts"] = "sample"
    # BLIP/BLIP-2: text prefixes; chat families: user turns; PaliGemma: task prefix ("caption en");
    # Florence-2: a task token ("<MORE_DETAILED_CAPTION>"). Default: the family's own (families.py)
    prompts: list[str] = []
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
    """How the retrieval backend searches the caption bank: top-k above a cosine threshold.

    index: exact   blocked exact search on the device (fp16 bank, fp32 accumulation), ties by bank id
           ivfpq   faiss IVF-PQ, built once per bank and cached beside it (CPU-only runs of big banks);
                   its recall@k against exact search is measured on `recall_sample` images and logged
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    IVFPQ_KEYS: ClassVar[frozenset[str]] = frozenset({"ivf_nlist", "ivf_nprobe", "pq_m"})
    threshold: float = Field(0.271, ge=-1, le=1)  # the paper's value for ViT-L/14 on CC12M
    index: Literal["exact", "ivfpq"] = "exact"
    ivf_nlist: PositiveInt | None = None  # ivfpq: inverted lists; default ~sqrt(bank size)
    ivf_nprobe: PositiveInt = 32  # ivfpq: lists visited per query
    pq_m: PositiveInt | None = None  # ivfpq: bytes per code (divides the width); default width / 8
    search_memory_mib: PositiveInt = 2048  # the search's own memory per rank (speed only)
    recall_sample: int = Field(1000, ge=0)  # ivfpq: images whose recall@k is measured (0: none)

    @field_validator("index", mode="before")
    @classmethod
    def _renamed(cls, value):
        if value in ("flat", "ivf"):
            raise ValueError(f"index {value!r} was replaced: use 'exact' or 'ivfpq'")
        return value

    @model_validator(mode="after")
    def _ivfpq_keys_need_ivfpq(self) -> "SearchOptions":
        unused = sorted(self.IVFPQ_KEYS & self.model_fields_set) if self.index != "ivfpq" else []
        if unused:
            raise ValueError(f"{', '.join(unused)}: only used with index 'ivfpq'")
        return self


class ServerOptions(BaseModel):
    """How the `server` backend reaches an OpenAI-compatible inference server (vLLM, SGLang, LMDeploy,
    `transformers serve`): an existing one at `endpoint`, several (`endpoints`: engines serving the same
    model, fed by outstanding requests), or one the stage starts per task with `serve` (a command;
    `{model}`, `{port}` and `{gpu}` are filled in; with `gpus`, one server per listed local GPU). The
    request settings that decide the captions (endpoint, the model name, prompts, sampling) are
    fingerprinted; the rest only change speed or how failures are tolerated (SPEED_ONLY). `endpoints`
    is speed only: a pool of engines of one model, like `gpus`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "serve",
            "endpoints",
            "gpus",
            "port",
            "startup_timeout_s",
            "api_key_env",
            "max_concurrency",
            "timeout_s",
            "deadline_s",
            "max_reply_bytes",
            "retries",
            "backoff_s",
            "max_failed_fraction",
        }
    )
    endpoint: str | None = Field(None, pattern=r"^https?://")  # base URL, e.g. http://node12:8000
    endpoints: list[Annotated[str, Field(pattern=r"^https?://")]] | None = Field(None, min_length=1)
    serve: str | None = None  # e.g. "vllm serve {model} --port {port}"; run with /bin/sh
    gpus: list[str] | None = Field(None, min_length=1)  # serve: one server per local GPU ({gpu} each)
    port: int | None = Field(None, ge=1, le=65535)  # serve: default a free port on 127.0.0.1
    startup_timeout_s: float = Field(900, gt=0)  # serve: wait this long for /health or /v1/models
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable's NAME
    max_concurrency: PositiveInt = 16  # requests in flight per endpoint
    timeout_s: float = Field(120, gt=0)  # per socket operation (connect, each read)
    deadline_s: float = Field(600, gt=0)  # the whole of one request (queue, answer), even a trickled one
    max_reply_bytes: PositiveInt = 1 << 20  # a longer answer fails its image
    retries: int = Field(3, ge=0)  # extra attempts on connection errors, timeouts, 429 and 5xx
    backoff_s: float = Field(1.0, ge=0)  # first retry's wait; doubles per attempt (at most 30 s)
    max_failed_fraction: float = Field(0.5, ge=0, le=1)  # of a shard's images, before the stage stops

    @model_validator(mode="after")
    def _one_server(self) -> "ServerOptions":
        if sum(x is not None for x in (self.endpoint, self.endpoints, self.serve)) != 1:
            raise ValueError(
                "set exactly one of `endpoint` (a running server), `endpoints` (several) "
                "or `serve` (a command)"
            )
        for name in ("port", "gpus"):
            if getattr(self, name) is not None and self.serve is None:
                raise ValueError(f"{name}: only used with `serve`")
        if self.port is not None and self.gpus and len(self.gpus) > 1:
            raise ValueError("port: one fixed port cannot serve several `gpus` (leave it out: free ports)")
        return self

    @property
    def urls(self) -> list[str]:
        """The base URLs to send requests to (for `serve`, filled in once the servers run)."""
        return list(self.endpoints) if self.endpoints else [self.endpoint] if self.endpoint else []


@dataclass(frozen=True)
class RuntimeOptions:
    """Where a model runs; speed only, never part of a fingerprint."""

    device: str = "cpu"
    dtype: str = "float32"
